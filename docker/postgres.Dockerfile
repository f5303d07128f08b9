# PostgreSQL for the MLflow store, from Debian's packages (PostgreSQL 15), for hosts that cannot
# pull postgres:16.6: the official image's contract as compose.yaml uses it (POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB create the role and database on the first start, data in
# /var/lib/postgresql/data, port 5432, pg_isready). docker/build-local.sh builds it as
# dwlab-postgres:15 on its Debian base; compose.yaml takes it as POSTGRES_IMAGE=dwlab-postgres:15.
#   docker build --network host -f docker/postgres.Dockerfile -t dwlab-postgres:15 docker
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# no 'main' cluster from the package: the entry point makes one in PGDATA on the first start
RUN mkdir -p /etc/postgresql-common \
    && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /run/postgresql \
    && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY --chmod=755 postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
USER postgres
EXPOSE 5432
CMD ["postgres-entrypoint"]
