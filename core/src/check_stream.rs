//! EXPERIMENTAL (issue 27): checks as messages on one long-lived gRPC bidirectional
//! stream per Envoy worker, instead of one HTTP/2 request per check. Both ends of the
//! wire live here so they cannot drift apart.
//!
//! gRPC does not care about the codec, and neither end needs to look inside the
//! other's JSON: a check message is an 8-byte big-endian id followed by the
//! `/v1/check` request body ([`crate::check::CheckRequest`] as JSON), and an answer is
//! the same id, the HTTP status `/v1/check` would have answered (2 bytes, big-endian)
//! and that answer's body. The filter hands the body to the same code that reads a
//! `/v1/check` answer. Answers come in the order the checks finish, not the order sent.

/// The stream's gRPC service and method: `POST /mcpguard.v1.Check/Stream` on the check
/// port, behind the check secret like every check route.
pub const SERVICE: &str = "mcpguard.v1.Check";
pub const METHOD: &str = "Stream";
pub const PATH: &str = "/mcpguard.v1.Check/Stream";

/// Largest message either end accepts (a check body is far smaller; the check port's
/// default body limit is 16 KiB).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A check message: `id` and the `/v1/check` request body.
pub fn encode_check(id: u64, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(8 + body.len());
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(body);
    message
}

/// `(id, request body)`; `None` for a message too short to hold an id.
pub fn decode_check(message: &[u8]) -> Option<(u64, &[u8])> {
    let (id, body) = message.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*id), body))
}

/// An answer message: the check's `id`, the status and body `/v1/check` would answer.
pub fn encode_answer(id: u64, status: u16, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(10 + body.len());
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&status.to_be_bytes());
    message.extend_from_slice(body);
    message
}

/// `(id, status, body)`; `None` for a message too short to hold an id and a status.
pub fn decode_answer(message: &[u8]) -> Option<(u64, u16, &[u8])> {
    let (id, rest) = message.split_first_chunk::<8>()?;
    let (status, body) = rest.split_first_chunk::<2>()?;
    Some((u64::from_be_bytes(*id), u16::from_be_bytes(*status), body))
}

/// A gRPC length-prefixed frame (uncompressed) around `message`; the server writes
/// these itself (Envoy's gRPC client frames the filter's messages for it).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    // Messages are bounded by MAX_MESSAGE, far below u32::MAX.
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(message);
    frame
}

/// What the front of a stream's bytes holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole message, `len` bytes from offset 5; the frame takes `5 + len`.
    Message { len: usize },
    /// Not all there yet.
    Partial,
    /// Compressed (no codec was negotiated) or larger than [`MAX_MESSAGE`]: the
    /// stream is broken.
    Invalid,
}

pub fn next_frame(buf: &[u8]) -> Frame {
    let Some((header, rest)) = buf.split_first_chunk::<5>() else {
        return Frame::Partial;
    };
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if header[0] != 0 || len > MAX_MESSAGE {
        Frame::Invalid
    } else if rest.len() < len {
        Frame::Partial
    } else {
        Frame::Message { len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_and_answer_round_trip() {
        let m = encode_check(7, b"{\"server\":\"demo\"}");
        assert_eq!(decode_check(&m), Some((7, &b"{\"server\":\"demo\"}"[..])));
        let a = encode_answer(u64::MAX, 503, b"{}");
        assert_eq!(decode_answer(&a), Some((u64::MAX, 503, &b"{}"[..])));
        assert_eq!(decode_check(&[0; 7]), None);
        assert_eq!(decode_answer(&[0; 9]), None);
    }

    #[test]
    fn frames_split_and_bounded() {
        let f = grpc_frame(b"hello");
        assert_eq!(next_frame(&f), Frame::Message { len: 5 });
        assert_eq!(&f[5..], b"hello");
        assert_eq!(next_frame(&f[..4]), Frame::Partial);
        assert_eq!(next_frame(&f[..7]), Frame::Partial);
        let mut compressed = f.clone();
        compressed[0] = 1;
        assert_eq!(next_frame(&compressed), Frame::Invalid);
        let huge = [0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(next_frame(&huge), Frame::Invalid);
    }
}
