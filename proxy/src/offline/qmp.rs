//! A line-oriented QMP client, enough to drive a throwaway QEMU for `profile capture --from-qmp`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::ProxyError;

/// A line-oriented QMP client: QEMU writes one JSON object per line; events may come between a
/// command and its answer and are skipped.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: String,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp, ProxyError> {
        let socket = path.display().to_string();
        let stream = UnixStream::connect(path)
            .map_err(|e| ProxyError::io(format!("connect to qmp socket {socket}"), e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| ProxyError::io("qmp socket timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| ProxyError::io("qmp socket", e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            socket,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("expected the QMP greeting"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    pub fn protocol(&self, message: &str) -> ProxyError {
        ProxyError::Qmp {
            socket: self.socket.clone(),
            problem: message.to_owned(),
        }
    }

    fn read_message(&mut self) -> Result<serde_json::Value, ProxyError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| ProxyError::io(format!("read qmp {}", self.socket), e))?;
        if n == 0 {
            return Err(self.protocol("connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(&format!("invalid json: {e}")))
    }

    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, ProxyError> {
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| ProxyError::io(format!("write qmp {}", self.socket), e))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(self.protocol(&format!("{command} failed: {error}")));
            }
        }
    }
}
