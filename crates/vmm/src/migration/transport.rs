//! The migration connection: plain TCP, or TLS (rustls) with a pre-shared certificate.
//!
//! `cowvm receive --tls-cert --tls-key` serves TLS 1.3 with its certificate; the source trusts
//! only the certificate it was given (`--tls-ca`: the destination's own certificate, or the CA
//! that signed it) and checks that it names the destination (the host of the address, or
//! `--tls-server-name`). There is no client authentication. The handshake completes right
//! after the TCP connection, before anything of the VM is sent: a wrong certificate, or a
//! peer that does not speak the same protocol, fails the migration before the pause.
//!
//! Each end uses its connection from two sides: the destination's page service reads answers
//! on one thread (`migration-in`) while fault and prefetch threads write requests. A plain
//! [`TcpStream`] is cloned into a [`ReadHalf`] and a [`WriteHalf`] that each use the socket
//! directly, as they always did. A TLS connection is one rustls state machine (keys, sequence
//! numbers) for both directions, so the halves share it behind a mutex that is never held
//! while blocked on the socket:
//! - the reader reads raw bytes from its clone of the socket *without* the lock, then takes it
//!   to feed them to rustls (`read_tls`, `process_new_packets`) and to take the plaintext;
//! - the writer takes the lock to encrypt a buffer into its own vector of TLS records, drops
//!   it, then writes the records to the socket. Only the writer writes to the socket, so the
//!   records go out in the order they were encrypted; what rustls queues while reading (a key
//!   update) goes out with the next write or flush.
//!
//! So a writer blocked on a full socket never stops the reader from draining the other
//! direction, and no thread is added: the halves are the same two ends the plain connection
//! has, and plain TCP pays one enum match per buffered read or write.
//!
//! Around the switchover each end waits for a small message the other sends within a
//! millisecond or two. Sleeping in the kernel there costs more than the message: on a host
//! whose cores are virtual, a core that went idle takes milliseconds to wake. So for those
//! waits ([`ReadHalf::spin_waits`]) a read polls the socket for a bounded time before it
//! blocks.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use thiserror::Error;

use super::wire::{self, Kind};
use crate::error::ErrorKind;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Raw TLS bytes read from the socket at a time.
const RAW_READ: usize = 1 << 16;

/// Errors of a migration's TLS: its files and settings, and the handshake.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read.
    #[error("cannot read the {what} {path}")]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A file holds no PEM section of the expected kind.
    #[error("{path} holds no PEM {what}")]
    Missing {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file is not valid PEM.
    #[error("{path} is not a valid PEM {what}: {why}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The certificates or the key are not usable (not X.509, a key that does not match).
    #[error("{path}: unusable for TLS")]
    Unusable {
        /// The file at fault (the certificate, or the key for a mismatch).
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// The name to verify the destination's certificate against is neither a DNS name nor an
    /// IP address.
    #[error("{0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    /// A server name without a certificate to verify it with.
    #[error("a TLS server name needs the destination's certificate to verify (tls_ca)")]
    NameWithoutCa,
    /// The handshake failed: a certificate that does not verify, a protocol error.
    #[error("TLS handshake with {peer} failed")]
    Handshake {
        /// The other end.
        peer: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// The peer closed the connection during the handshake.
    #[error("TLS handshake with {peer} failed: the peer closed the connection{hint}")]
    HandshakeClosed {
        /// The other end.
        peer: String,
        /// What that may mean, from this side.
        hint: &'static str,
    },
    /// The peer did not complete the handshake in time.
    #[error("TLS handshake with {peer} timed out after {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout {
        /// The other end.
        peer: String,
    },
    /// The connection failed during the handshake.
    #[error("TLS handshake with {peer} failed")]
    HandshakeIo {
        /// The other end.
        peer: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A source that speaks plain TCP reached a receiver that serves TLS.
    #[error(
        "the source {peer} speaks plain TCP, but this receiver serves TLS only (the source \
         must migrate with --tls-ca)"
    )]
    PlainPeer {
        /// The source.
        peer: String,
    },
}

impl TlsError {
    /// What kind of failure this is: settings and files are the caller's to fix.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TlsError::Read { .. }
            | TlsError::Missing { .. }
            | TlsError::Pem { .. }
            | TlsError::Unusable { .. }
            | TlsError::ServerName(_)
            | TlsError::NameWithoutCa => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
}

fn pem_error(what: &'static str, path: &Path, e: pem::Error) -> TlsError {
    let path = path.to_path_buf();
    match e {
        pem::Error::Io(source) => TlsError::Read { what, path, source },
        pem::Error::NoItemsFound => TlsError::Missing { what, path },
        other => TlsError::Pem {
            what,
            path,
            why: other.to_string(),
        },
    }
}

/// Every certificate in the PEM file `path` (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const WHAT: &str = "certificate";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(WHAT, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(WHAT, path, pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// TLS for `cowvm receive`: the certificate it presents and its private key.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl TlsServer {
    /// Loads the certificate chain (`cert`, PEM, the destination's certificate first) and its
    /// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsServer, TlsError> {
        let unusable = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Unusable { path, source }
        };
        let certs = certificates(cert)?;
        let private =
            PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("private key", key, e))?;
        let provider = Arc::new(aws_lc_rs::default_provider());
        // Parsed once here so that a bad key is named as such.
        provider
            .key_provider
            .load_private_key(private.clone_key())
            .map_err(unusable(key))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(unusable(cert))?
            .with_no_client_auth()
            .with_single_cert(certs, private)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => unusable(key)(e),
                _ => unusable(cert)(e),
            })?;
        // One connection per receiver: nothing to resume.
        config.send_tls13_tickets = 0;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on an accepted `stream` from `peer`. A source that speaks plain TCP
    /// is told, in its own framing, why it is refused.
    pub(super) fn handshake(
        &self,
        stream: &mut TcpStream,
        peer: &str,
    ) -> Result<Connection, TlsError> {
        set_timeouts(stream, Some(HANDSHAKE_TIMEOUT), peer)?;
        let mut first = [0u8; 1];
        let seen = stream
            .peek(&mut first)
            .map_err(|e| handshake_error(e, peer, ""))?;
        if seen == 1 && first[0] == wire::MAGIC[0] {
            refuse_plain(stream);
            return Err(TlsError::PlainPeer {
                peer: peer.to_string(),
            });
        }
        let tls = rustls::ServerConnection::new(self.config.clone()).map_err(|source| {
            TlsError::Handshake {
                peer: peer.to_string(),
                source,
            }
        })?;
        handshake(tls.into(), stream, peer, "")
    }
}

/// TLS for a migration's source: the only certificates it trusts, and the name the
/// destination's certificate must carry.
pub(super) struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    /// Trusts the certificates in `ca` (PEM) and nothing else; verifies `name`.
    pub(super) fn load(ca: &Path, name: &str) -> Result<TlsClient, TlsError> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::ServerName(name.to_string()))?;
        let unusable = |source| TlsError::Unusable {
            path: ca.to_path_buf(),
            source,
        };
        let mut roots = RootCertStore::empty();
        for cert in certificates(ca)? {
            roots.add(cert).map_err(unusable)?;
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(unusable)?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the handshake on a connected `stream` to `peer`.
    pub(super) fn handshake(
        &self,
        stream: &mut TcpStream,
        peer: &str,
    ) -> Result<Connection, TlsError> {
        let tls =
            ClientConnection::new(self.config.clone(), self.name.clone()).map_err(|source| {
                TlsError::Handshake {
                    peer: peer.to_string(),
                    source,
                }
            })?;
        set_timeouts(stream, Some(HANDSHAKE_TIMEOUT), peer)?;
        handshake(
            tls.into(),
            stream,
            peer,
            " (a cowvm receive without --tls-cert speaks plain TCP)",
        )
    }
}

/// Tells a plain source that this receiver serves TLS only, then waits (at most the handshake
/// timeout) for it to close, so that what it sent unread does not reset the connection before
/// it reads why.
fn refuse_plain(stream: &mut TcpStream) {
    let why = b"this receiver serves TLS only: migrate with --tls-ca (its certificate)";
    if wire::write_frame(stream, Kind::Abort, &[why]).is_ok()
        && stream.shutdown(Shutdown::Write).is_ok()
    {
        let _ = io::copy(&mut stream.take(1 << 20), &mut io::sink());
    }
}

fn set_timeouts(stream: &TcpStream, t: Option<Duration>, peer: &str) -> Result<(), TlsError> {
    stream
        .set_read_timeout(t)
        .and_then(|()| stream.set_write_timeout(t))
        .map_err(|source| TlsError::HandshakeIo {
            peer: peer.to_string(),
            source,
        })
}

/// Completes the handshake (the socket's timeouts set), then lifts the timeouts.
fn handshake(
    mut tls: Connection,
    stream: &mut TcpStream,
    peer: &str,
    closed_hint: &'static str,
) -> Result<Connection, TlsError> {
    while tls.is_handshaking() {
        tls.complete_io(stream)
            .map_err(|e| handshake_error(e, peer, closed_hint))?;
    }
    set_timeouts(stream, None, peer)?;
    // The writer bounds what it hands over at a time (its caller's buffer), and drains every
    // record after each write.
    tls.set_buffer_limit(None);
    Ok(tls)
}

fn handshake_error(e: io::Error, peer: &str, hint: &'static str) -> TlsError {
    let peer = peer.to_string();
    match e.kind() {
        io::ErrorKind::InvalidData => match e.into_inner().map(|inner| inner.downcast()) {
            Some(Ok(source)) => TlsError::Handshake {
                peer,
                source: *source,
            },
            Some(Err(inner)) => TlsError::HandshakeIo {
                peer,
                source: io::Error::new(io::ErrorKind::InvalidData, inner),
            },
            None => TlsError::HandshakeIo {
                peer,
                source: io::ErrorKind::InvalidData.into(),
            },
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsError::HandshakeClosed { peer, hint },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TlsError::HandshakeTimeout { peer },
        _ => TlsError::HandshakeIo { peer, source: e },
    }
}

/// Locks `m`, whoever panicked holding it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Splits a connected `stream` (after its handshake, with `tls`) into its two halves.
pub(super) fn split(
    stream: TcpStream,
    tls: Option<Connection>,
) -> io::Result<(ReadHalf, WriteHalf)> {
    let reading = stream.try_clone()?;
    Ok(match tls {
        None => (
            ReadHalf::Plain(Socket::new(reading)),
            WriteHalf::Plain(stream),
        ),
        Some(tls) => {
            let tls = Arc::new(Mutex::new(tls));
            (
                ReadHalf::Tls(TlsReader {
                    tls: tls.clone(),
                    socket: Socket::new(reading),
                    raw: vec![0; RAW_READ].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
                WriteHalf::Tls(TlsWriter {
                    tls,
                    socket: stream,
                    records: Vec::new(),
                }),
            )
        }
    })
}

/// The reading end of a migration connection.
pub(super) enum ReadHalf {
    Plain(Socket),
    Tls(TlsReader),
}

impl ReadHalf {
    /// From now on a read that would wait polls the socket for up to `spin` first (zero:
    /// it blocks at once).
    pub(super) fn spin_waits(&mut self, spin: Duration) {
        match self {
            ReadHalf::Plain(s) => s.spin = spin,
            ReadHalf::Tls(t) => t.socket.spin = spin,
        }
    }
}

/// A socket read from, which may poll before it blocks.
pub(super) struct Socket {
    socket: TcpStream,
    spin: Duration,
}

impl Socket {
    fn new(socket: TcpStream) -> Socket {
        Socket {
            socket,
            spin: Duration::ZERO,
        }
    }

    /// Polls until the socket has something to read (or an error or end to report), for up
    /// to `spin`.
    fn poll_readable(&self) {
        let start = Instant::now();
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while start.elapsed() < self.spin {
            // SAFETY: `fd` is one valid pollfd naming a socket this value owns; a zero
            // timeout only asks whether it is readable now.
            if unsafe { libc::poll(&mut fd, 1, 0) } != 0 {
                return;
            }
            std::thread::yield_now();
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.spin.is_zero() {
            self.poll_readable();
        }
        self.socket.read(buf)
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(s) => s.read(buf),
            ReadHalf::Tls(t) => t.read(buf),
        }
    }
}

/// The writing end of a migration connection.
pub(super) enum WriteHalf {
    Plain(TcpStream),
    Tls(TlsWriter),
}

impl WriteHalf {
    /// The socket under both halves (to shut it down).
    pub(super) fn socket(&self) -> &TcpStream {
        match self {
            WriteHalf::Plain(s) => s,
            WriteHalf::Tls(t) => &t.socket,
        }
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => s.write(buf),
            WriteHalf::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => s.flush(),
            WriteHalf::Tls(t) => t.flush(),
        }
    }
}

/// Reads plaintext from the shared TLS connection; waits for the socket without the lock.
pub(super) struct TlsReader {
    tls: Arc<Mutex<Connection>>,
    socket: Socket,
    /// Raw TLS bytes read, `start..end` not yet given to rustls.
    raw: Box<[u8]>,
    start: usize,
    end: usize,
    /// The socket reached its end (rustls is told once, with an empty read).
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut tls = lock(&self.tls);
                match tls.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Plaintext, a clean close, or the end of the socket without one.
                    done => return done,
                }
                if self.start < self.end || self.eof {
                    let mut raw = &self.raw[self.start..self.end];
                    tls.read_tls(&mut raw)?;
                    self.start = self.end - raw.len();
                    tls.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            let n = self.socket.read(&mut self.raw)?;
            (self.start, self.end, self.eof) = (0, n, n == 0);
        }
    }
}

/// Encrypts under the lock, writes the records to the socket after it.
pub(super) struct TlsWriter {
    tls: Arc<Mutex<Connection>>,
    socket: TcpStream,
    /// The TLS records of the latest write, reused.
    records: Vec<u8>,
}

impl TlsWriter {
    /// Takes the records rustls has queued (after `then` adds plaintext) and sends them.
    fn send(
        &mut self,
        then: impl FnOnce(&mut Connection) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.records.clear();
        let n = {
            let mut tls = lock(&self.tls);
            let n = then(&mut tls)?;
            while tls.wants_write() {
                tls.write_tls(&mut self.records)?;
            }
            n
        };
        self.socket.write_all(&self.records)?;
        Ok(n)
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(|tls| tls.writer().write(buf))
    }

    /// Sends what rustls queued on its own (a key update answered while reading).
    fn flush(&mut self) -> io::Result<()> {
        self.send(|_| Ok(0)).map(drop)
    }
}
