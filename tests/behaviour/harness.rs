//! The suite's own test runner, on libtest-mimic: every test runs on a fresh two-worker Tokio
//! runtime, and a test that cannot run on this machine (no database server, no Envoy) reports as
//! ignored with its reason instead of `ok`. Under `CI=true` nothing may be skipped: a missing
//! prerequisite fails the test.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

use libtest_mimic::{Completion, Failed, Trial};

use crate::support::Backend;

/// A test body.
pub type TestFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

tokio::task_local! {
    static SKIPPED: RefCell<Option<String>>;
}

/// Whether this run is CI's, where every test must run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// Records that the running test cannot run here, for `reason`; the test then returns early and
/// reports as ignored. Under `CI=true` this panics instead: CI runs every test.
#[track_caller]
pub fn skip(reason: impl Into<String>) {
    let reason = reason.into();
    if in_ci() {
        panic!("{reason}: CI=true runs every test, so this one fails instead of being skipped");
    }
    SKIPPED
        .try_with(|skipped| *skipped.borrow_mut() = Some(reason))
        .expect("skip() is called from inside a test of the harness");
}

/// The runtime a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Flavor {
    /// Two worker threads, like a small production server.
    MultiThread,
    /// Everything on the test's thread, for tests that install a thread-local log subscriber.
    CurrentThread,
}

fn run(flavor: Flavor, test: impl FnOnce() -> TestFuture + Send + 'static) -> Result<Completion, Failed> {
    let mut builder = match flavor {
        Flavor::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime =
        builder.enable_all().build().map_err(|error| Failed::from(format!("cannot start a runtime: {error}")))?;
    let skipped = runtime.block_on(SKIPPED.scope(RefCell::new(None), async move {
        test().await;
        SKIPPED.with(|skipped| skipped.borrow_mut().take())
    }));
    Ok(skipped.map_or(Completion::Completed, Completion::ignored_with))
}

/// One test per backend, named `{module}::{backend}::{test}`.
pub fn per_backend(module: &str, test: &str, body: fn(Backend) -> TestFuture) -> Vec<Trial> {
    [("sqlite", Backend::Sqlite), ("postgres", Backend::Postgres), ("mysql", Backend::MySql)]
        .into_iter()
        .map(|(name, backend)| {
            Trial::ignorable_test(format!("{module}::{name}::{test}"), move || {
                run(Flavor::MultiThread, move || body(backend))
            })
        })
        .collect()
}

/// A test that runs once, named `{module}::{test}`.
pub fn once(module: &str, test: &str, flavor: Flavor, body: fn() -> TestFuture) -> Trial {
    Trial::ignorable_test(format!("{module}::{test}"), move || run(flavor, body))
}

/// Declares a module's tests: `every_backend` ones take a `Backend` and run on SQLite,
/// PostgreSQL and MySQL; `once` ones take nothing; `current_thread` ones take nothing and run on
/// a single-threaded runtime.
#[macro_export]
macro_rules! trials {
    (
        every_backend: [$($per_backend:ident),* $(,)?],
        once: [$($once:ident),* $(,)?]
        $(, current_thread: [$($current_thread:ident),* $(,)?])? $(,)?
    ) => {
        /// This module's tests.
        #[allow(clippy::vec_init_then_push)]
        pub fn trials() -> Vec<libtest_mimic::Trial> {
            let module = module_path!().rsplit("::").next().unwrap_or_default();
            #[allow(unused_mut)]
            let mut trials = Vec::new();
            $(trials.extend($crate::harness::per_backend(module, stringify!($per_backend), |backend| {
                Box::pin($per_backend(backend))
            }));)*
            $(trials.push($crate::harness::once(
                module, stringify!($once), $crate::harness::Flavor::MultiThread, || Box::pin($once()),
            ));)*
            $($(trials.push($crate::harness::once(
                module, stringify!($current_thread), $crate::harness::Flavor::CurrentThread, || Box::pin($current_thread()),
            ));)*)?
            trials
        }
    };
}
