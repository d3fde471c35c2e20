//! `keygate`: parse configuration, set up logging, run until SIGTERM or Ctrl-C. Errors are
//! printed as one plain message (never a backtrace) with exit code 2 for a bad configuration
//! and 1 for anything that went wrong while running.

use std::process::ExitCode;

use keygate::config::{self, Command, Config, ConfigCommand, DatabaseConfig, LogFormat};
use keygate::config_file::{self, CliError};
use keygate::server::{self, App};
use keygate::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match config_file::parse(std::env::args_os()) {
        Ok((cli, _)) => cli,
        Err(CliError::Clap(error)) if !error.use_stderr() => {
            return print(error.render().to_string(), ExitCode::SUCCESS);
        }
        Err(CliError::Clap(error)) => return fail(config::explain_cli_error(&error), 2),
        Err(CliError::File(error)) => return fail(error, 2),
    };
    let result = match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => {
            let config = match Config::from_args(&args) {
                Ok(config) => config,
                Err(error) => return fail(error, 2),
            };
            let telemetry = telemetry::init(config.log_format);
            let served = async { App::bind(config).await?.run(server::shutdown_signal()).await }.await;
            telemetry.shutdown();
            served
        }
        Command::Migrate(args) => match DatabaseConfig::from_args(&args.database) {
            Ok(database) => {
                let _telemetry = telemetry::init(LogFormat::Text);
                server::migrate(&database).await.map(|applied| println!("{applied}"))
            }
            Err(error) => return fail(error, 2),
        },
        Command::GenToken => {
            keygate::domain::key::new_admin_token().map(|token| println!("{token}")).map_err(Into::into)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            return match config_file::check(&file) {
                Ok(effective) => print(effective, ExitCode::SUCCESS),
                Err(error) => fail(error, 2),
            };
        }
        Command::Client(command) => {
            return match keygate::cli::run(command).await {
                Ok(exit) => ExitCode::from(exit as u8),
                Err(failure) => fail(failure.message, failure.exit as u8),
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(format!("{error:#}"), 1),
    }
}

fn print(text: String, code: ExitCode) -> ExitCode {
    print!("{text}");
    code
}

fn fail(message: String, code: u8) -> ExitCode {
    eprintln!("keygate: {}", message.trim_end().trim_start_matches("error: "));
    ExitCode::from(code)
}
