//! The `Stream` RPC's HTTP/2 response, written by hand so that every stream shares one encoded
//! buffer per message.
//!
//! tonic's server encodes each outbound message into the stream's own buffer: a policy push to
//! 10,000 nodes was 10,000 copies of the (40 KB compressed) snapshot, 400 MB of fresh pages
//! faulted in at once (36 % of the companion's push profile). Here a message is framed once
//! ([`frame`]: the gRPC length prefix and the protobuf bytes in one [`Bytes`]), and every stream's
//! body hands out a reference to it; HTTP/2 splits it into DATA frames without copying. The
//! inbound half (Hello, ACKs, usage) is tonic's own decoder, and every other RPC of the service
//! goes to the generated server unchanged ([`Routed`]).

use super::service::PolicyServer;
use crate::pb::policy_service_server::PolicyServiceServer;
use guardrail_proto::Bytes;
use hyper::body::Frame;
use prost::bytes::{BufMut, BytesMut};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;

/// The RPC whose response this module writes.
pub const STREAM_PATH: &str = "/guardrail.v1.PolicyService/Stream";

/// `message` as one gRPC length-prefixed message: not compressed (0), its length (u32, big
/// endian), its protobuf encoding.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    // Messages are bounded far below 4 GiB (MAX_POLICY_JSON_BYTES); saturate rather than wrap.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Infallible: the buffer has room for `encoded_len` bytes.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// What a stream's task hands its response body.
#[derive(Debug)]
pub enum Out {
    /// A framed message (see [`frame`]).
    Message(Bytes),
    /// The end of the stream with this status (sent as the trailers).
    End(Status),
}

/// The response body of one stream: its task's messages, then trailers — the task's status, or
/// OK when the task drops its sender.
struct Outbound {
    rx: mpsc::Receiver<Out>,
    ended: bool,
}

impl hyper::body::Body for Outbound {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Out::Message(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Some(Out::End(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// `grpc-status` and `grpc-message` for `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if let Err(unencodable) = status.add_header(&mut map) {
        map.clear();
        let _ = unencodable.add_header(&mut map);
    }
    map
}

/// A response that ends at once with `status` (gRPC's trailers-only form).
fn refused(status: Status) -> http::Response<Body> {
    status.into_http()
}

/// An HTTP/2 response streaming what the task sends on `rx`.
pub fn streaming(rx: mpsc::Receiver<Out>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Outbound { rx, ended: false }));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// The policy service: `Stream` answered here, every other RPC by the generated server.
#[derive(Clone)]
pub struct Routed {
    generated: PolicyServiceServer<PolicyServer>,
    server: PolicyServer,
}

impl Routed {
    pub fn new(server: PolicyServer, max_decoding_message_size: usize) -> Self {
        let generated = PolicyServiceServer::new(server.clone()).max_decoding_message_size(max_decoding_message_size);
        Routed { generated, server }
    }
}

impl NamedService for Routed {
    const NAME: &'static str = <PolicyServiceServer<PolicyServer> as NamedService>::NAME;
}

impl tonic::codegen::Service<http::Request<Body>> for Routed {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != STREAM_PATH {
            return self.generated.call(request);
        }
        // tonic's server refuses a compressed request it has no decoder for; so does this one.
        let encoding =
            request.headers().get("grpc-encoding").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let response = match encoding {
            Some(encoding) if encoding != "identity" => {
                refused(Status::unimplemented(format!("Content is compressed with `{encoding}` which isn't supported")))
            }
            _ => self.server.open(request),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardrail_proto::v1;
    use http_body_util::BodyExt;
    use prost::Message;

    fn fleet(day: u64) -> v1::ServerMessage {
        v1::ServerMessage {
            msg: Some(v1::server_message::Msg::Fleet(v1::FleetState { day, exhausted_apps: vec!["app-a".into()] })),
        }
    }

    #[test]
    fn a_frame_is_the_grpc_length_prefix_and_the_message() {
        let message = fleet(20_533);
        let frame = frame(&message);
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - 5);
        assert_eq!(v1::ServerMessage::decode(&frame[5..]).unwrap(), message);
    }

    /// The body hands out each frame as it was queued, then the task's status as trailers; a task
    /// that just drops its sender ends the stream with OK.
    #[tokio::test]
    async fn the_body_sends_frames_then_the_status_as_trailers() {
        for (end, code) in [(Some(Status::resource_exhausted("too fast")), "8"), (None, "0")] {
            let (tx, rx) = mpsc::channel(4);
            let first = frame(&fleet(1));
            tx.send(Out::Message(first.clone())).await.unwrap();
            if let Some(status) = end {
                tx.send(Out::End(status)).await.unwrap();
            }
            drop(tx);
            let response = streaming(rx);
            assert_eq!(response.headers()[http::header::CONTENT_TYPE], "application/grpc");
            let mut body = response.into_body();
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data, first);
            assert_eq!(data.as_ptr(), first.as_ptr(), "the queued buffer itself, not a copy");
            let trailers = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
            assert_eq!(trailers["grpc-status"], code);
            assert!(body.frame().await.is_none(), "nothing after the trailers");
        }
    }
}
