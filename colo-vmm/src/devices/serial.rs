//! COM1: a 16550 UART (vm-superio) whose output goes to stdout, a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::str::FromStr;

use vm_superio::{Serial, Trigger};

/// Where the console's output goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    None,
}

impl FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
                _ => Err(format!("'{s}': expected stdio, file:PATH or none")),
            },
        }
    }
}

/// The guest does not use interrupts; the UART's interrupt line goes nowhere.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Output that flushes at each newline, so a log file follows the guest closely.
struct LineWriter(Box<dyn Write + Send>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf.contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The console device.
pub struct SerialConsole {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, LineWriter>,
}

impl SerialConsole {
    /// Opens the output.
    pub fn new(output: &SerialOutput) -> io::Result<SerialConsole> {
        let w: Box<dyn Write + Send> = match output {
            SerialOutput::Stdio => Box::new(io::stdout()),
            SerialOutput::File(p) => Box::new(File::create(p)?),
            SerialOutput::None => Box::new(io::sink()),
        };
        Ok(SerialConsole { uart: Serial::new(NoInterrupt, LineWriter(w)) })
    }

    /// A register read.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A register write; output errors are logged, never fatal.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!(error = ?e, "serial output failed");
        }
    }
}
