//! The gRPC message framing of a request body, followed as its chunks pass by: each message is
//! a compressed flag (1 byte), a length (4 bytes, big-endian) and that many bytes, as the gRPC
//! over HTTP/2 protocol defines "Length-Prefixed-Message".

/// The length prefix of a message, in bytes.
const PREFIX_BYTES: usize = 5;

/// What a chunk of a body holds, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes of the message in progress: of its prefix or of its payload.
    Bytes(&'a [u8]),
    /// The message in progress is complete.
    End,
}

/// Where a body is in its sequence of messages.
#[derive(Debug, Default)]
pub struct Framing {
    prefix: [u8; PREFIX_BYTES],
    prefix_read: usize,
    /// Payload bytes of the message in progress still to come, once its prefix is read.
    payload_left: usize,
}

impl Framing {
    /// Splits `chunk` into the pieces of the messages it continues, holds and begins.
    pub fn split<'a>(&mut self, mut chunk: &'a [u8], mut visit: impl FnMut(Piece<'a>)) {
        while !chunk.is_empty() {
            if self.prefix_read < PREFIX_BYTES {
                let taken = (PREFIX_BYTES - self.prefix_read).min(chunk.len());
                self.prefix[self.prefix_read..self.prefix_read + taken].copy_from_slice(&chunk[..taken]);
                self.prefix_read += taken;
                visit(Piece::Bytes(&chunk[..taken]));
                chunk = &chunk[taken..];
                if self.prefix_read == PREFIX_BYTES {
                    let length = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                    self.payload_left = length as usize;
                    if self.payload_left == 0 {
                        self.prefix_read = 0;
                        visit(Piece::End);
                    }
                }
                continue;
            }
            let taken = self.payload_left.min(chunk.len());
            visit(Piece::Bytes(&chunk[..taken]));
            chunk = &chunk[taken..];
            self.payload_left -= taken;
            if self.payload_left == 0 {
                self.prefix_read = 0;
                visit(Piece::End);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(framing: &mut Framing, chunk: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        framing.split(chunk, |piece| {
            seen.push(match piece {
                Piece::Bytes(bytes) => format!("{}", bytes.len()),
                Piece::End => "end".to_owned(),
            })
        });
        seen
    }

    #[test]
    fn messages_are_followed_across_and_within_chunks() {
        let mut framing = Framing::default();
        // Two messages of 3 and 0 bytes in one chunk, then a 4-byte one split in three.
        let chunk = [0, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(pieces(&mut framing, &chunk), ["5", "3", "end", "5", "end", "2"]);
        assert_eq!(pieces(&mut framing, &[0, 0, 4, 9]), ["3", "1"]);
        assert_eq!(pieces(&mut framing, &[9, 9, 9]), ["3", "end"]);
    }
}
