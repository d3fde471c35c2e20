//! keygate's behaviour suite: black-box tests against a real server, run on SQLite always and on
//! PostgreSQL and MySQL when `KEYGATE_TEST_POSTGRES_URL` / `KEYGATE_TEST_MYSQL_URL` are set. A test
//! that cannot run here reports as ignored with its reason (see `harness`).

mod envoy_support;
mod harness;
mod raw_h2;
mod support;

mod abuse;
mod answers;
mod authorization;
mod caching;
mod checks;
mod cli;
mod gateway;
mod hostile;
mod http_json;
mod import;
mod isolation;
mod jwt;
mod keys;
mod limits;
mod observability;
mod outage;
mod process;
mod products;
mod readme;
mod replicas;
mod rotation;
mod server;
mod tenants_and_sites;
mod tls;
mod traces;
mod usage;
mod validation;

fn main() -> std::process::ExitCode {
    let arguments = libtest_mimic::Arguments::from_args();
    let trials: Vec<libtest_mimic::Trial> = [
        abuse::trials(),
        answers::trials(),
        authorization::trials(),
        caching::trials(),
        checks::trials(),
        cli::trials(),
        gateway::trials(),
        hostile::trials(),
        http_json::trials(),
        import::trials(),
        isolation::trials(),
        jwt::trials(),
        keys::trials(),
        limits::trials(),
        observability::trials(),
        outage::trials(),
        process::trials(),
        products::trials(),
        readme::trials(),
        replicas::trials(),
        rotation::trials(),
        server::trials(),
        tenants_and_sites::trials(),
        tls::trials(),
        traces::trials(),
        usage::trials(),
        validation::trials(),
    ]
    .into_iter()
    .flatten()
    .collect();
    libtest_mimic::run(&arguments, trials).exit_code()
}
