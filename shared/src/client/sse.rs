//! `text/event-stream` bodies of streamed steps, parsed into [`StepEvent`]s.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::StatusCode;

use super::{ClientError, StepEvent};
use crate::agent::{OutputChunk, StepResult, sse_event};
use crate::error::ErrorBody;

/// Parses a `text/event-stream` body into step events.
pub(super) fn step_events(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
) -> impl Stream<Item = Result<StepEvent, ClientError>> {
    let body = Box::pin(body);
    // `scanned`: how far `buf` is known to hold no event end, so a large
    // event (a result with megabytes of output) is scanned once, not once
    // per chunk.
    futures::stream::unfold(
        (body, Vec::<u8>::new(), 0usize, false),
        |(mut body, mut buf, mut scanned, done)| async move {
            if done {
                return None;
            }
            loop {
                // An end may straddle chunks: look back 3 bytes.
                let from = scanned.saturating_sub(3);
                if let Some((at, len)) = find_event_end(&buf[from..]) {
                    let raw: Vec<u8> = buf.drain(..from + at + len).collect();
                    scanned = 0;
                    match parse_event(&raw[..from + at]) {
                        Some(ev) => return Some((ev, (body, buf, scanned, false))),
                        None => continue,
                    }
                }
                scanned = buf.len();
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((Err(ClientError::from(e)), (body, buf, scanned, true)));
                    }
                    None => return None,
                }
            }
        },
    )
}

/// Position and length of the blank line that ends the first event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_event(raw: &[u8]) -> Option<Result<StepEvent, ClientError>> {
    let text = String::from_utf8_lossy(raw);
    let mut name = "message".to_owned();
    let mut data = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() {
        return None;
    }
    let bad = |e: serde_json::Error| ClientError::Protocol {
        status: StatusCode::OK.as_u16(),
        detail: format!("bad {name} event: {e}"),
    };
    Some(match name.as_str() {
        sse_event::STDOUT => serde_json::from_str::<OutputChunk>(&data)
            .map(|c| StepEvent::Stdout(c.data))
            .map_err(bad),
        sse_event::STDERR => serde_json::from_str::<OutputChunk>(&data)
            .map(|c| StepEvent::Stderr(c.data))
            .map_err(bad),
        sse_event::RESULT => serde_json::from_str::<StepResult>(&data)
            .map(|r| StepEvent::Result(Box::new(r)))
            .map_err(bad),
        sse_event::ERROR => serde_json::from_str::<ErrorBody>(&data)
            .map(StepEvent::Error)
            .map_err(bad),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_parsed_across_chunk_boundaries() {
        let chunks: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"event: stdout\ndata: {\"da")),
            Ok(Bytes::from_static(
                b"ta\":\"hi\\n\"}\n\nevent: stderr\r\ndata: {\"data\":\"e\"}\r\n\r\n",
            )),
            Ok(Bytes::from_static(b": keep-alive\n\n")),
        ];
        let events: Vec<_> = step_events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].as_ref().unwrap(),
            &StepEvent::Stdout("hi\n".into())
        );
        assert_eq!(events[1].as_ref().unwrap(), &StepEvent::Stderr("e".into()));
    }

    /// Every event end split across chunks, one byte at a time, and a large
    /// event in many chunks (scanned incrementally, still whole).
    #[tokio::test]
    async fn event_ends_split_byte_by_byte_and_large_events() {
        let big = "x".repeat(300_000);
        let text = format!(
            "event: stdout\r\ndata: {{\"data\":\"a\"}}\r\n\r\nevent: stderr\ndata: {{\"data\":\"b\"}}\n\nevent: stdout\ndata: {{\"data\":\"{big}\"}}\n\n"
        );
        let bytes = text.into_bytes();
        for piece in [1usize, 3, 4096] {
            let chunks: Vec<reqwest::Result<Bytes>> = bytes
                .chunks(piece)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if piece == 1 && bytes.len() > 1000 {
                // Byte by byte only over the small events.
                let small: Vec<reqwest::Result<Bytes>> = bytes[..80]
                    .chunks(1)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                let events: Vec<_> = step_events(futures::stream::iter(small)).collect().await;
                assert_eq!(events.len(), 2, "piece 1");
                continue;
            }
            let events: Vec<_> = step_events(futures::stream::iter(chunks)).collect().await;
            assert_eq!(events.len(), 3, "piece {piece}");
            assert_eq!(events[0].as_ref().unwrap(), &StepEvent::Stdout("a".into()));
            assert_eq!(events[1].as_ref().unwrap(), &StepEvent::Stderr("b".into()));
            assert_eq!(events[2].as_ref().unwrap(), &StepEvent::Stdout(big.clone()));
        }
    }
}
