//! COM1: a 16550 UART (vm-superio) whose output goes to stdout, a file, or nowhere.

use std::io::{self, Write};
use std::path::PathBuf;
use std::str::FromStr;

use vm_superio::serial::{NoEvents, SerialState};
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

impl SerialOutput {
    /// Opens the output; `append` continues an existing file (a restored VM's log goes on).
    fn open(&self, append: bool) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOutput::Stdio => Box::new(io::stdout()),
            SerialOutput::File(p) => {
                Box::new(std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(p)?)
            }
            SerialOutput::None => Box::new(io::sink()),
        })
    }
}

/// The UART's registers and receive buffer, as saved in snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    /// The UART state these registers describe.
    fn state(&self) -> SerialState {
        let r = self.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// A `--serial` value that is none of the three forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}': expected stdio, file:PATH or none")]
pub struct SerialOptionError(String);

impl FromStr for SerialOutput {
    type Err = SerialOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
                _ => Err(SerialOptionError(s.into())),
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
    uart: Serial<NoInterrupt, NoEvents, LineWriter>,
}

impl SerialConsole {
    /// Opens the output (truncating a file).
    pub fn new(output: &SerialOutput) -> io::Result<SerialConsole> {
        Ok(SerialConsole { uart: Serial::new(NoInterrupt, LineWriter(output.open(false)?)) })
    }

    /// Opens the output, appending to a file (a restored VM's log goes on).
    pub fn appending(output: &SerialOutput) -> io::Result<SerialConsole> {
        Ok(SerialConsole { uart: Serial::new(NoInterrupt, LineWriter(output.open(true)?)) })
    }

    /// Takes over saved registers, keeping this console's output (a checkpoint loaded into a
    /// running VM). Registers that do not load leave the console as it was.
    pub fn load(&mut self, snap: &SerialSnapshot) {
        let state = snap.state();
        let sink = || LineWriter(Box::new(io::sink()));
        // Check first: from_state consumes the writer even when it fails.
        if let Err(e) = Serial::from_state(&state, NoInterrupt, NoEvents, sink()) {
            tracing::warn!(error = ?e, "loading UART registers failed; keeping the console as it was");
            return;
        }
        let writer = std::mem::replace(&mut self.uart, Serial::new(NoInterrupt, sink())).into_writer();
        self.uart = Serial::from_state(&state, NoInterrupt, NoEvents, writer).expect("checked above");
    }

    /// The registers to save.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
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
