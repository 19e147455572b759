//! A minimal HTTP/1.1 client over one keep-alive TCP connection, one request at a time:
//! the same discipline and about the same client-side cost as the RESP client, so the
//! clients weigh the same on both sides of the comparison.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Http {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    body: Vec<u8>,
    wbuf: Vec<u8>,
}

impl Http {
    pub async fn connect(addr: &str) -> Result<Http> {
        let mut h = Http {
            addr: addr.to_owned(),
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
            body: Vec::with_capacity(16 * 1024),
            wbuf: Vec::with_capacity(1024),
        };
        h.reconnect().await?;
        Ok(h)
    }

    async fn reconnect(&mut self) -> Result<()> {
        let s = TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.buf.clear();
        Ok(())
    }

    pub async fn get(&mut self, path: &str, token: Option<&str>) -> Result<(u16, &[u8])> {
        self.request("GET", path, token, None).await
    }

    pub async fn post(
        &mut self,
        path: &str,
        token: Option<&str>,
        json: &[u8],
    ) -> Result<(u16, &[u8])> {
        self.request("POST", path, token, Some(json)).await
    }

    /// Sends one request and reads the whole response; returns the status and the body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, &[u8])> {
        if self.stream.is_none() {
            self.reconnect().await?;
        }
        self.wbuf.clear();
        self.wbuf.extend_from_slice(method.as_bytes());
        self.wbuf.push(b' ');
        self.wbuf.extend_from_slice(path.as_bytes());
        self.wbuf.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.wbuf.extend_from_slice(self.addr.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        if let Some(t) = token {
            self.wbuf.extend_from_slice(b"Authorization: Bearer ");
            self.wbuf.extend_from_slice(t.as_bytes());
            self.wbuf.extend_from_slice(b"\r\n");
        }
        if let Some(b) = body {
            self.wbuf.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                )
                .as_bytes(),
            );
        }
        self.wbuf.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            self.wbuf.extend_from_slice(b);
        }
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(&self.wbuf).await?;
        match self.read_response().await {
            Ok((status, close)) => {
                if close {
                    self.stream = None;
                }
                Ok((status, &self.body))
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let stream = self.stream.as_mut().expect("connected");
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        let n = stream.read(&mut self.buf[len..]).await?;
        self.buf.truncate(len + n);
        if n == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    /// Reads one response into `self.body`; returns (status, connection closes).
    async fn read_response(&mut self) -> Result<(u16, bool)> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.parse::<usize>().context("content-length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
        self.buf.drain(..head_end);
        self.body.clear();
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text = std::str::from_utf8(&self.buf[..line_end])?;
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .context("chunk size")?;
                while self.buf.len() < line_end + 2 + size + 2 {
                    self.fill().await?;
                }
                self.body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = len {
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.body.extend_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
        } else {
            bail!("a response without a length");
        }
        Ok((status, close))
    }
}
