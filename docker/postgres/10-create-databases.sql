-- Run once by the postgres image's entrypoint, on the first start with an empty data volume
-- (/docker-entrypoint-initdb.d), as $POSTGRES_USER. One database per server: Prefect and
-- MLflow each migrate their own schema into theirs. The names must match the connection
-- URLs in docker-compose.yml (tests/test_compose.py checks that they do).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
