//! A minimal Redis client: RESP2 over one TCP connection, one command at a time (no
//! pipelining: each command waits for its reply before the next is written).

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            Reply::Simple(s) => Some(s),
            _ => None,
        }
    }
}

pub struct Redis {
    stream: TcpStream,
    rbuf: Vec<u8>,
    /// Start of the unparsed bytes in `rbuf`.
    at: usize,
    wbuf: Vec<u8>,
}

impl Redis {
    pub async fn connect(addr: &str) -> Result<Redis> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to Redis at {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Redis {
            stream,
            rbuf: Vec::with_capacity(16 * 1024),
            at: 0,
            wbuf: Vec::with_capacity(1024),
        })
    }

    /// Sends one command and waits for its reply. A Redis error reply is an `Err`.
    pub async fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply> {
        self.wbuf.clear();
        encode(&mut self.wbuf, args);
        self.stream.write_all(&self.wbuf).await?;
        match self.read_reply().await? {
            Reply::Error(e) => bail!("Redis answered: {e}"),
            r => Ok(r),
        }
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        loop {
            if self.at < self.rbuf.len()
                && let Some((r, used)) = parse(&self.rbuf[self.at..])?
            {
                self.at += used;
                if self.at == self.rbuf.len() {
                    self.rbuf.clear();
                    self.at = 0;
                }
                return Ok(r);
            }
            if self.at > 0 {
                self.rbuf.drain(..self.at);
                self.at = 0;
            }
            let len = self.rbuf.len();
            self.rbuf.resize(len + 16 * 1024, 0);
            let n = self.stream.read(&mut self.rbuf[len..]).await?;
            self.rbuf.truncate(len + n);
            if n == 0 {
                bail!("Redis closed the connection");
            }
        }
    }
}

fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let i = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..i], i + 2))
}

fn int(b: &[u8]) -> Result<i64> {
    std::str::from_utf8(b)?
        .parse()
        .with_context(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(b)))
}

/// One reply from the start of `buf`, and how many bytes it took; `None` if incomplete.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((l, mut used)) = line(&buf[1..]) else {
        return Ok(None);
    };
    used += 1;
    let text = || String::from_utf8_lossy(l).into_owned();
    Ok(Some(match kind {
        b'+' => (Reply::Simple(text()), used),
        b'-' => (Reply::Error(text()), used),
        b':' => (Reply::Int(int(l)?), used),
        b'$' => {
            let n = int(l)?;
            if n < 0 {
                (Reply::Bulk(None), used)
            } else {
                let n = n as usize;
                if buf.len() < used + n + 2 {
                    return Ok(None);
                }
                (
                    Reply::Bulk(Some(buf[used..used + n].to_vec())),
                    used + n + 2,
                )
            }
        }
        b'*' => {
            let n = int(l)?;
            if n < 0 {
                (Reply::Array(None), used)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match parse(&buf[used..])? {
                        Some((r, u)) => {
                            items.push(r);
                            used += u;
                        }
                        None => return Ok(None),
                    }
                }
                (Reply::Array(Some(items)), used)
            }
        }
        k => bail!("bad RESP type byte {k:#x}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_and_partial_replies() {
        let full = b"*2\r\n*2\r\n$2\r\nd1\r\n:5\r\n$-1\r\n";
        let (r, used) = parse(full).unwrap().unwrap();
        assert_eq!(used, full.len());
        assert_eq!(
            r,
            Reply::Array(Some(vec![
                Reply::Array(Some(vec![Reply::Bulk(Some(b"d1".to_vec())), Reply::Int(5)])),
                Reply::Bulk(None),
            ]))
        );
        for cut in 0..full.len() {
            assert!(parse(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }
}
