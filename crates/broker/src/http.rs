//! Admin HTTP: `/health`, `/ready`, `/metrics`, `/v1/cluster`, `/v1/queues`, `/v1/queues/{name}`.
//! Runs on the tokio runtime; queue and cluster views are answered by the node loop.

use crate::node::{NodeCmd, Rejection};
use crate::Shared;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tern_proto::admin::{AdminErrorBody, AdminRequest};
use tern_proto::Status;

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{name}", get(queue))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("admin HTTP server failed: {e}");
    }
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    if s.node_tx.is_disconnected() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node loop stopped\n").into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
        .into_response()
}

async fn cluster(State(s): State<Arc<Shared>>) -> Response {
    admin(&s, AdminRequest::ClusterStatus).await
}

async fn queues(State(s): State<Arc<Shared>>) -> Response {
    admin(&s, AdminRequest::ListQueues).await
}

async fn queue(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    admin(&s, AdminRequest::QueueStats { name }).await
}

async fn admin(s: &Shared, req: AdminRequest) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if s.node_tx
        .send_async(NodeCmd::Admin { req, reply: tx })
        .await
        .is_err()
    {
        return error(Rejection::new(Status::Unavailable, "node loop stopped"));
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(reply))) => Json(reply).into_response(),
        Ok(Ok(Err(r))) => error(r),
        _ => error(Rejection::new(
            Status::Timeout,
            "no answer from the node loop",
        )),
    }
}

fn error(r: Rejection) -> Response {
    let code = match r.status {
        Status::UnknownQueue => StatusCode::NOT_FOUND,
        Status::InvalidArgument => StatusCode::BAD_REQUEST,
        Status::Timeout | Status::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(AdminErrorBody { error: r.message })).into_response()
}
