//! `keygate`: parse configuration, set up logging, run until SIGTERM or Ctrl-C.

use anyhow::anyhow;
use clap::Parser;
use keygate::config::{Cli, Command, Config, DatabaseConfig, LogFormat};
use keygate::server::{self, App};
use keygate::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => {
            let config = Config::from_args(&args).map_err(|error| anyhow!(error))?;
            let telemetry = telemetry::init(config.log_format);
            let served = App::bind(config).await?.run(server::shutdown_signal()).await;
            telemetry.shutdown();
            served
        }
        Command::Migrate(args) => {
            let _telemetry = telemetry::init(LogFormat::Text);
            server::migrate(&DatabaseConfig::from_args(&args).map_err(|error| anyhow!(error))?).await
        }
        Command::GenToken => {
            println!("{}", keygate::domain::key::new_admin_token()?);
            Ok(())
        }
    }
}
