//! Answering a client ourselves: a rejection's status and one-line JSON body, and closing
//! politely when the client's body was not read to its end.

use std::time::Duration;

use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::body::ClientBody;
use crate::reject::Reject;

/// Answers with a rejection. When the client's body was not read to its end the connection
/// cannot be reused; it is drained for a moment first, so the client reads the answer instead
/// of a reset (the kernel resets a socket closed with unread data).
pub async fn respond(session: &mut Session, r: &Reject, client_done: bool) {
    respond_with(session, r, client_done, None).await;
}

/// `respond`, draining through `reader` (the upload's own body reader) when given.
pub async fn respond_with(
    session: &mut Session,
    r: &Reject,
    client_done: bool,
    reader: Option<&mut ClientBody>,
) {
    let body = r.body();
    let mut head = match ResponseHeader::build(r.status, Some(3)) {
        Ok(h) => h,
        Err(_) => return,
    };
    let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
    if !client_done {
        session.set_keepalive(None);
        let _ = head.insert_header(http::header::CONNECTION, "close");
    }
    if session
        .write_response_header(Box::new(head), false)
        .await
        .is_err()
    {
        return;
    }
    if session.write_response_body(Some(body), true).await.is_err() {
        return;
    }
    // HTTP/2 ends the stream without touching the connection: nothing to drain.
    if !client_done && !session.as_downstream().is_http2() {
        linger(session, reader).await;
    }
}

async fn linger(session: &mut Session, reader: Option<&mut ClientBody>) {
    const MAX_BYTES: usize = 64 << 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut drained = 0;
    let mut own;
    let reader = match reader {
        Some(r) => r,
        None => {
            own = ClientBody::pingora(Duration::from_secs(2));
            &mut own
        }
    };
    while drained < MAX_BYTES {
        match tokio::time::timeout_at(deadline, reader.read(session)).await {
            Ok(Ok(Some(b))) => drained += b.len(),
            _ => break,
        }
    }
}
