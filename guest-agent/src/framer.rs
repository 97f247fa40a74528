//! Splits the byte stream from the host into JSON objects.
//!
//! The protocol sends JSON objects one after another, usually one a line,
//! but neither newlines nor any other separator are required. The framer
//! counts brackets outside strings and hands out each complete top-level
//! object as raw bytes; parsing them is left to serde_json.
//!
//! Limits and recovery:
//! * an object longer than [`MAX_REQUEST`] bytes or nested deeper than
//!   [`MAX_DEPTH`] gives one error frame, and the rest of its line is
//!   discarded;
//! * anything outside an object that is not whitespace (the start of
//!   something that is not an object) gives one error frame and the rest of
//!   the line is discarded;
//! * a 0xFF byte (never part of valid UTF-8, so never part of valid JSON)
//!   resets the framer: the host sends it before `guest-sync-delimited` to
//!   flush whatever half-request an earlier client left behind.

/// Longest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Deepest nesting of objects and arrays accepted in a request.
pub const MAX_DEPTH: usize = 32;

/// One thing the framer found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level `{...}`, not yet parsed.
    Object(Vec<u8>),
    /// Input that cannot become a request.
    Error(FrameError),
}

/// Why input was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    TooLarge,
    TooDeep,
    NotAnObject,
}

impl FrameError {
    pub fn describe(self) -> String {
        match self {
            FrameError::TooLarge => format!("request larger than {MAX_REQUEST} bytes"),
            FrameError::TooDeep => format!("request nested deeper than {MAX_DEPTH} levels"),
            FrameError::NotAnObject => "JSON parse error: expected a JSON object".to_string(),
        }
    }
}

/// Streaming splitter; keeps the partial object between reads.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Discarding up to the next newline after an error.
    skipping: bool,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any partial object (a new connection, or a 0xFF byte).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.skipping = false;
    }

    /// True while part of an object is buffered.
    pub fn is_partial(&self) -> bool {
        self.depth > 0
    }

    /// Feeds bytes; complete objects and errors are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.push_byte(b, out);
        }
    }

    fn fail(&mut self, err: FrameError, b: u8, out: &mut Vec<Frame>) {
        self.reset();
        // The offending byte may itself end the line.
        self.skipping = b != b'\n';
        out.push(Frame::Error(err));
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if b == 0xFF {
            self.reset();
            return;
        }
        if self.skipping {
            if b == b'\n' {
                self.skipping = false;
            }
            return;
        }
        if self.depth == 0 {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' => {
                    self.buf.clear();
                    self.buf.push(b);
                    self.depth = 1;
                }
                _ => self.fail(FrameError::NotAnObject, b, out),
            }
            return;
        }
        self.buf.push(b);
        if self.buf.len() > MAX_REQUEST {
            self.fail(FrameError::TooLarge, b, out);
            return;
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.fail(FrameError::TooDeep, b, out);
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    out.push(Frame::Object(std::mem::take(&mut self.buf)));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        f.push(input, &mut out);
        out
    }

    #[test]
    fn splits_concatenated_and_line_separated_objects() {
        let out = frames(b"{\"a\":1}{\"b\":\"}{\"}\n  {\"c\":[1,{\"d\":2}]}\n");
        assert_eq!(
            out,
            vec![
                Frame::Object(b"{\"a\":1}".to_vec()),
                Frame::Object(b"{\"b\":\"}{\"}".to_vec()),
                Frame::Object(b"{\"c\":[1,{\"d\":2}]}".to_vec()),
            ]
        );
    }

    #[test]
    fn object_split_across_reads() {
        let mut f = Framer::new();
        let mut out = Vec::new();
        f.push(b"{\"execute\":", &mut out);
        assert!(out.is_empty());
        assert!(f.is_partial());
        f.push(b" \"x\\\"}\"}", &mut out);
        assert_eq!(
            out,
            vec![Frame::Object(b"{\"execute\": \"x\\\"}\"}".to_vec())]
        );
    }

    #[test]
    fn garbage_skips_to_end_of_line() {
        let out = frames(b"hello {\"not\": 1}\n{\"ok\":1}");
        assert_eq!(
            out,
            vec![
                Frame::Error(FrameError::NotAnObject),
                Frame::Object(b"{\"ok\":1}".to_vec())
            ]
        );
    }

    #[test]
    fn xff_resets_partial_request() {
        let out = frames(b"{\"half\": [1, 2\xff{\"ok\":1}");
        assert_eq!(out, vec![Frame::Object(b"{\"ok\":1}".to_vec())]);
    }

    #[test]
    fn too_deep_and_too_large() {
        let mut deep = "[".repeat(MAX_DEPTH + 5).into_bytes();
        deep.insert(0, b'{');
        deep.extend_from_slice(b"\n{\"ok\":1}");
        assert_eq!(
            frames(&deep),
            vec![
                Frame::Error(FrameError::TooDeep),
                Frame::Object(b"{\"ok\":1}".to_vec())
            ]
        );
        let mut big = b"{\"s\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST + 10));
        big.extend_from_slice(b"\"}\n{\"ok\":1}");
        assert_eq!(
            frames(&big),
            vec![
                Frame::Error(FrameError::TooLarge),
                Frame::Object(b"{\"ok\":1}".to_vec())
            ]
        );
    }
}
