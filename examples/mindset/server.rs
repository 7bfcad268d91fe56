//! The inspector's web server (axum): one static page with plain JavaScript
//! (`page.html`, no build step) and a JSON API over an [`Inspector`].
//!
//! The inspector lives on its own thread and takes requests one at a time
//! (the model runs on the CPU and its stores are read in order), so the
//! server needs neither the model nor the stores to be shared between
//! threads.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /` | the page |
//! | `GET /api/model` | layers, rows, capacity, growth over training, sources |
//! | `POST /api/explain` `{"prompt": "…", "top": 5}` | per token and memory layer: memories read, next tokens |
//! | `GET /api/memory/{block}/{id}?head=H` | one memory: tags, promoted tokens (through head `H` when the heads share a table), contexts |
//! | `DELETE /api/memory/{block}/{id}` | deletes it from the store |
//! | `GET /api/memories/{block}?tag=T&after=ID&limit=N` | browse by id order, by tag |
//! | `GET /api/nearest/{block}/{id}?k=N` | the memories nearest its key |
//! | `POST /api/forget` `{"source": "…"}` | forgets a memorised source |
//!
//! Errors answer `{"error": "…"}` with 400 (the request), 409 (a store
//! that another process holds open) or 500 (the stores or the model).

use std::path::PathBuf;
use std::sync::mpsc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use memstore::MemoryId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::inspector::{InspectError, Inspector};

/// The page, served as it is.
pub const PAGE: &str = include_str!("page.html");

type Job = Box<dyn FnOnce(&mut Inspector) + Send>;

/// A handle on the inspector's thread.
#[derive(Clone)]
pub struct Handle {
    jobs: mpsc::Sender<Job>,
}

impl Handle {
    /// Opens the inspector of `run_dir` on a thread of its own (the model is
    /// loaded there); fails if it cannot be opened. `prepare` runs on the
    /// inspector once it is open (e.g. a context scan).
    pub fn spawn(
        run_dir: PathBuf,
        prepare: impl FnOnce(&mut Inspector) -> Result<(), InspectError> + Send + 'static,
    ) -> Result<Handle, InspectError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, opened) = mpsc::channel();
        std::thread::Builder::new()
            .name("mindset-inspector".into())
            .spawn(move || {
                let mut inspector = match Inspector::open(&run_dir).and_then(|mut i| {
                    prepare(&mut i)?;
                    Ok(i)
                }) {
                    Ok(i) => {
                        let _ = ready.send(Ok(()));
                        i
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                for job in queue {
                    job(&mut inspector);
                }
            })
            .map_err(|e| InspectError::Io {
                path: "mindset-inspector thread".into(),
                source: e,
            })?;
        opened
            .recv()
            .map_err(|_| InspectError::BadRequest("the inspector thread stopped while opening".into()))??;
        Ok(Handle { jobs })
    }

    /// Runs `f` on the inspector and waits for its answer.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inspector) -> Result<T, InspectError> + Send + 'static,
    ) -> Result<T, InspectError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |i| {
                let _ = tx.send(f(i));
            }))
            .map_err(|_| InspectError::BadRequest("the inspector has stopped".into()))?;
        rx.await
            .map_err(|_| InspectError::BadRequest("the inspector stopped before answering".into()))?
    }
}

/// An error as the API answers it.
struct ApiError(InspectError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use burn_dmt::DmtError as D;
        let status = match &self.0 {
            InspectError::BadRequest(_)
            | InspectError::Model(
                D::InvalidArgument(_)
                | D::TokenOutOfRange { .. }
                | D::SequenceTooLong { .. }
                | D::Tokenizer(_)
                | D::UnknownSource { .. },
            ) => StatusCode::BAD_REQUEST,
            // A store file another process holds (memstore's file lock).
            InspectError::Store(e) | InspectError::Model(D::Store(e)) if is_locked(e) => StatusCode::CONFLICT,
            InspectError::Store(_) | InspectError::Model(_) | InspectError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.0.to_string() }))).into_response()
    }
}

/// Whether `e` is a store file that another opener holds.
fn is_locked(e: &memstore::Error) -> bool {
    match e {
        memstore::Error::Storage(source) => {
            matches!(
                source.downcast_ref::<memstore::FileError>(),
                Some(memstore::FileError::Locked(_))
            )
        }
        _ => false,
    }
}

impl From<InspectError> for ApiError {
    fn from(e: InspectError) -> Self {
        ApiError(e)
    }
}

type Answer = Result<Json<Value>, ApiError>;

/// The page and the API over `inspector`.
pub fn router(inspector: Handle) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/model", get(model))
        .route("/api/explain", post(explain))
        .route("/api/memory/{block}/{id}", get(memory).delete(delete))
        .route("/api/memories/{block}", get(browse))
        .route("/api/nearest/{block}/{id}", get(nearest))
        .route("/api/forget", post(forget))
        .with_state(inspector)
}

async fn model(State(h): State<Handle>) -> Answer {
    Ok(Json(h.call(|i| i.model_view()).await?))
}

#[derive(Deserialize)]
struct ExplainRequest {
    prompt: String,
    #[serde(default = "five")]
    top: usize,
}

fn five() -> usize {
    5
}

async fn explain(State(h): State<Handle>, Json(r): Json<ExplainRequest>) -> Answer {
    let top = r.top.clamp(1, 50);
    Ok(Json(h.call(move |i| i.explain_prompt(&r.prompt, top)).await?))
}

#[derive(Deserialize)]
struct MemoryQuery {
    head: Option<usize>,
}

async fn memory(
    State(h): State<Handle>,
    Path((block, id)): Path<(usize, MemoryId)>,
    Query(q): Query<MemoryQuery>,
) -> Answer {
    Ok(Json(h.call(move |i| i.memory_view(block, id, q.head, 10)).await?))
}

async fn delete(State(h): State<Handle>, Path((block, id)): Path<(usize, MemoryId)>) -> Answer {
    Ok(Json(h.call(move |i| i.delete(block, id)).await?))
}

#[derive(Deserialize)]
struct BrowseQuery {
    tag: Option<String>,
    after: Option<MemoryId>,
    limit: Option<usize>,
}

async fn browse(State(h): State<Handle>, Path(block): Path<usize>, Query(q): Query<BrowseQuery>) -> Answer {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let tag = q.tag.filter(|t| !t.is_empty());
    Ok(Json(
        h.call(move |i| i.browse(block, tag.as_deref(), q.after, limit)).await?,
    ))
}

#[derive(Deserialize)]
struct NearestQuery {
    k: Option<usize>,
}

async fn nearest(
    State(h): State<Handle>,
    Path((block, id)): Path<(usize, MemoryId)>,
    Query(q): Query<NearestQuery>,
) -> Answer {
    let k = q.k.unwrap_or(10).clamp(1, 100);
    Ok(Json(h.call(move |i| i.nearest(block, id, k)).await?))
}

#[derive(Deserialize)]
struct ForgetRequest {
    source: String,
}

async fn forget(State(h): State<Handle>, Json(r): Json<ForgetRequest>) -> Answer {
    Ok(Json(h.call(move |i| i.forget(&r.source)).await?))
}
