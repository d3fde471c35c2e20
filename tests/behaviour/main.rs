//! keygate's behaviour suite: black-box tests against a real server, run on SQLite always and on
//! PostgreSQL and MySQL when `KEYGATE_TEST_POSTGRES_URL` / `KEYGATE_TEST_MYSQL_URL` are set.

mod envoy_support;
mod support;

mod authorization;
mod caching;
mod checks;
mod gateway;
mod isolation;
mod keys;
mod limits;
mod observability;
mod outage;
mod process;
mod replicas;
mod rotation;
mod server;
mod tenants_and_sites;
mod tls;
mod traces;
mod usage;
mod validation;
