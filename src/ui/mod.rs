//! `vinetl ui`: a read-only jobs page over the state store, for the
//! operator who must see at a glance what runs, what waits and what failed.
//!
//! Server-side HTML ([`pages`], maud templates: everything from the store
//! is escaped), refreshed by the browser itself (`<meta http-equiv=refresh>`),
//! no JavaScript. Routes: `/` (the job list and the schedules),
//! `/jobs/{id}` (one job), and the same data as JSON at `/api/jobs`,
//! `/api/jobs/{id}` and `/api/schedules`.
//!
//! It owns its routes and HTML and nothing else: it reads the store through
//! the store's own read operations (`recent_jobs`, `counts`, `failures`,
//! the schedules' status)
//! and never writes to it; the command line opens the store for it.

mod pages;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;

use crate::store::{Failures, JobCounts, Store, StoreError};

pub use pages::{Progress, progress};

/// Jobs the list shows, newest first: enough for a night's runs, few
/// enough that counting them all every refresh stays cheap.
pub const LIST_JOBS: i64 = 30;
/// Failed rows and dead batches one job's page lists (`vinetl failures`
/// lists more).
pub const PAGE_FAILURES: i64 = 20;
/// Seconds between the pages' own refreshes.
pub const REFRESH_SECS: u32 = 5;

/// A running `vinetl ui`.
pub struct RunningUi {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningUi {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// The routes over `store`.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/", get(list_page))
        .route("/jobs/{id}", get(job_page))
        .route("/api/jobs", get(list_json))
        .route("/api/jobs/{id}", get(job_json))
        .route("/api/schedules", get(schedules_json))
        .with_state(store)
}

/// Listens on `bind` and serves the pages until [`RunningUi::stop`].
pub async fn spawn(store: Store, bind: &str) -> std::io::Result<RunningUi> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(store);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningUi { addr, shutdown: Some(tx), task })
}

/// `vinetl ui`: until SIGINT or SIGTERM.
pub async fn run(store: Store, bind: &str, state: &str) -> anyhow::Result<()> {
    let ui = spawn(store, bind).await.map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))?;
    eprintln!("vinetl ui: listening on {} (read-only, state {state})", ui.url());
    crate::shutdown_signal().await;
    eprintln!("vinetl ui: shutting down");
    ui.stop().await?;
    Ok(())
}

/// What went wrong, without the database's own text (it stays in the log).
enum UiError {
    NoJob(i64),
    Store(StoreError),
}

impl From<StoreError> for UiError {
    fn from(e: StoreError) -> UiError {
        UiError::Store(e)
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::NoJob(id) => (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
            UiError::Store(e) => {
                tracing::error!(error = %e, "the jobs page could not read the state store");
                (StatusCode::SERVICE_UNAVAILABLE, "the state store did not answer; vinetl ui's log says why")
                    .into_response()
            }
        }
    }
}

async fn jobs(store: &Store) -> Result<Vec<JobCounts>, UiError> {
    let mut out = Vec::new();
    for id in store.recent_jobs(LIST_JOBS).await? {
        // A job deleted between the two reads is simply not shown.
        out.extend(store.counts(id).await?);
    }
    Ok(out)
}

async fn job(store: &Store, id: i64) -> Result<(JobCounts, Failures), UiError> {
    let counts = store.counts(id).await?.ok_or(UiError::NoJob(id))?;
    let failures = store.failures(id, PAGE_FAILURES).await?.ok_or(UiError::NoJob(id))?;
    Ok((counts, failures))
}

fn html(markup: maud::Markup) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(markup.into_string())).into_response()
}

async fn list_page(State(store): State<Store>) -> Result<Response, UiError> {
    let jobs = jobs(&store).await?;
    let now = chrono::Utc::now();
    let schedules = crate::job::scheduler::status(&store, now).await?;
    Ok(html(pages::list(&jobs, &schedules, now)))
}

async fn job_page(State(store): State<Store>, Path(id): Path<i64>) -> Result<Response, UiError> {
    let (counts, failures) = job(&store, id).await?;
    Ok(html(pages::job(&counts, &failures, chrono::Utc::now())))
}

/// A job as the list shows it: its counts and its progress.
#[derive(serde::Serialize)]
struct ListedJob {
    #[serde(flatten)]
    counts: JobCounts,
    progress: Progress,
}

async fn list_json(State(store): State<Store>) -> Result<Json<Vec<ListedJob>>, UiError> {
    let now = chrono::Utc::now();
    let jobs = jobs(&store).await?;
    Ok(Json(jobs.into_iter().map(|c| ListedJob { progress: progress(&c, now), counts: c }).collect()))
}

async fn schedules_json(
    State(store): State<Store>,
) -> Result<Json<Vec<crate::job::scheduler::ScheduleStatus>>, UiError> {
    Ok(Json(crate::job::scheduler::status(&store, chrono::Utc::now()).await?))
}

async fn job_json(State(store): State<Store>, Path(id): Path<i64>) -> Result<Json<serde_json::Value>, UiError> {
    let (counts, failures) = job(&store, id).await?;
    let progress = progress(&counts, chrono::Utc::now());
    Ok(Json(serde_json::json!({"counts": counts, "progress": progress, "failures": failures})))
}
