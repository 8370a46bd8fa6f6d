//! Launching QEMU with a qtest and a QMP socket, and making sure it goes away.

use std::fs::{self, File};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::error::Error;
use crate::qmp::Qmp;
use crate::qtest::QTest;

/// How long QEMU gets to connect both sockets after it was spawned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on QMP `quit` (reply plus process exit) when stopping QEMU.
const QUIT_BOUND: Duration = Duration::from_secs(1);
/// How long QEMU gets to exit after SIGTERM before SIGKILL.
const TERM_BOUND: Duration = Duration::from_secs(2);
/// How long we wait for the process to disappear after SIGKILL.
const KILL_BOUND: Duration = Duration::from_secs(3);
/// Hint printed when the QEMU binary is missing.
const INSTALL_HINT: &str = "run test/scripts/install-deps.sh to install it, \
                            or point RVSCSI_QEMU at a qemu-system-x86_64 binary";

/// How to start QEMU. Start from [`QemuConfig::default`] and add devices to `args`.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The QEMU binary. Default: `$RVSCSI_QEMU`, else `qemu-system-x86_64` (from `PATH`).
    pub binary: PathBuf,
    /// Extra environment for the QEMU process (e.g. `QEMU_MODULE_DIR` for an unpacked
    /// QEMU 7.2).
    pub env: Vec<(String, String)>,
    /// `-machine` value. Default `q35`.
    pub machine: String,
    /// Guest RAM in MiB. Default 256.
    pub memory_mib: u32,
    /// Extra arguments (devices, drives...). At launch, the whitespace-separated words
    /// of `$RVSCSI_QEMU_ARGS` are appended after these.
    pub args: Vec<String>,
    /// Whether to open a QMP monitor socket. Default true.
    pub qmp: bool,
    /// Where QEMU logs the qtest traffic (`-qtest-log`). Default: `/dev/null`.
    pub qtest_log: Option<PathBuf>,
    /// Any qtest or QMP reply slower than this is an error ([`Error::Timeout`]):
    /// a wedged QEMU fails the test instead of hanging it. Default 20 s.
    pub reply_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: std::env::var_os("RVSCSI_QEMU")
                .filter(|s| !s.is_empty())
                .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from),
            env: Vec::new(),
            machine: "q35".to_string(),
            memory_mib: 256,
            args: Vec::new(),
            qmp: true,
            qtest_log: None,
            reply_timeout: Duration::from_secs(20),
        }
    }
}

impl QemuConfig {
    /// Same as [`QemuConfig::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends arguments, e.g. `.args(["-device", "virtio-scsi-pci,id=vs0"])`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Appends `-device SPEC`.
    pub fn device(self, spec: &str) -> Self {
        self.args(["-device", spec])
    }

    /// The full argument list QEMU gets for the given socket paths.
    fn command_line(&self, qtest_sock: &Path, qmp_sock: Option<&Path>) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-machine".into(),
            self.machine.clone(),
            // Debian builds no qtest accelerator; TCG with the vCPU stopped (-S) never
            // runs guest code, so the devices are ours alone.
            "-accel".into(),
            "tcg".into(),
            "-S".into(),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-qtest".into(),
            format!("unix:{}", chardev_path(qtest_sock)),
            "-qtest-log".into(),
            self.qtest_log
                .as_deref()
                .unwrap_or(Path::new("/dev/null"))
                .display()
                .to_string(),
        ];
        if let Some(q) = qmp_sock {
            a.push("-chardev".into());
            a.push(format!("socket,id=qmp0,path={}", chardev_path(q)));
            a.push("-mon".into());
            a.push("chardev=qmp0,mode=control".into());
        }
        a.extend(self.args.iter().cloned());
        if let Ok(extra) = std::env::var("RVSCSI_QEMU_ARGS") {
            a.extend(extra.split_whitespace().map(String::from));
        }
        a
    }
}

/// A path inside a QEMU option string: commas must be doubled.
fn chardev_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- private temp dir --------------------------------------------------------------

/// A directory with a unique name, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut base = std::env::temp_dir();
        // Unix socket paths are limited to 107 bytes.
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let mut last = None;
        for _ in 0..16 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!(
                "rvscsi-qtest-{}-{}-{:x}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed),
                nanos
            );
            let path = base.join(name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("cannot create a temp dir")))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---- spawning ------------------------------------------------------------------------

struct SpawnJob {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` from a dedicated thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Test harnesses run each test on its own short-lived thread, and the DDI
/// emulation may create QEMU on a worker thread; forking from a permanent thread makes
/// the death signal mean "the test process died".
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("rvscsi-qemu-spawner".into())
            .spawn(move || {
                for mut job in rx {
                    let _ = job.reply.send(job.cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(tx) = spawner else {
        // No spawner thread: fall back to this thread (death signal tied to it).
        let mut cmd = cmd;
        return cmd.spawn();
    };
    let (reply, rx) = mpsc::channel();
    tx.send(SpawnJob { cmd, reply })
        .map_err(|_| io::Error::other("QEMU spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("QEMU spawner thread is gone"))?
}

/// Arranges for the child to get SIGKILL when the process that spawned it dies.
fn kill_child_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    let hook = move || -> io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only and is
        // async-signal-safe, as required between fork and exec.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // If the parent died before prctl ran, the signal will never come: give up.
        // SAFETY: getppid(2) has no preconditions and is async-signal-safe.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only calls the
    // async-signal-safe prctl(2) and getppid(2) and builds io::Errors from raw OS codes,
    // which does not allocate; it touches no lock or state shared with the parent.
    unsafe {
        cmd.pre_exec(hook);
    }
}

// ---- the process ---------------------------------------------------------------------

/// The QEMU child process and where its stderr goes.
struct Process {
    child: Mutex<Child>,
    pid: u32,
    stderr_path: PathBuf,
}

impl Process {
    /// The exit status, if QEMU has exited (reaps it).
    fn try_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Polls for the exit for up to `bound`.
    fn wait_exit(&self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends SIGTERM unless QEMU was already reaped.
    fn terminate(&self) {
        let mut child = lock(&self.child);
        if let Ok(None) = child.try_wait() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill(2) takes plain integers and touches none of our memory. The
            // child is not reaped (try_wait just said so, and the lock we hold guards
            // the only handle that can reap it), so `pid` still names our QEMU and
            // cannot have been recycled for another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }

    /// Sends SIGKILL unless QEMU was already reaped.
    fn kill(&self) {
        let mut child = lock(&self.child);
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
    }

    /// The last lines of QEMU's stderr.
    fn stderr_tail(&self) -> String {
        const MAX: u64 = 2048;
        let Ok(mut f) = File::open(&self.stderr_path) else {
            return String::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len > MAX {
            let _ = f.seek(SeekFrom::Start(len - MAX));
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(20);
        lines[start..].join("\n")
    }

    /// "QEMU (pid N) exited with ...; stderr: ..." for error messages.
    fn describe(&self) -> String {
        // The socket closes while the process exits: give it a moment to be reapable.
        let status = self.wait_exit(Duration::from_millis(200));
        let mut s = match status {
            Some(st) => format!("QEMU (pid {}) {}", self.pid, describe_status(st)),
            None => format!("QEMU (pid {}) is still running", self.pid),
        };
        let tail = self.stderr_tail();
        if tail.trim().is_empty() {
            s.push_str("; stderr is empty");
        } else {
            s.push_str("; stderr tail:\n");
            s.push_str(&tail);
        }
        s
    }
}

fn describe_status(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("exited ({st})"),
    }
}

// ---- Qemu ----------------------------------------------------------------------------

/// A running QEMU with a connected qtest client and (optionally) QMP monitor.
///
/// Dropping it stops QEMU: QMP `quit` (bounded to about 1 s), then SIGTERM and up to
/// 2 s, then SIGKILL; it never blocks forever and never panics. The child is also
/// spawned with `PR_SET_PDEATHSIG = SIGKILL`, so QEMU dies with the test process even
/// when no destructor runs (abort, `kill -9` of the test).
pub struct Qemu {
    qtest: Arc<QTest>,
    qmp: Option<Mutex<Qmp>>,
    process: Arc<Process>,
    cmdline: Vec<String>,
    stopped: bool,
    // Declared last: removed after the process is gone.
    dir: TempDir,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("pid", &self.process.pid)
            .field("dir", &self.dir.path())
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

impl Qemu {
    /// Starts QEMU and connects to it.
    ///
    /// Listens on two Unix sockets in a fresh private temp dir, spawns QEMU (stdin null,
    /// stdout and stderr to a file in that dir), accepts its connections within 10 s
    /// (failing early, with QEMU's stderr tail, if it exits first), negotiates QMP
    /// capabilities and does a first qtest round trip, which completes only once the
    /// machine is fully initialised.
    pub fn launch(cfg: QemuConfig) -> Result<Qemu, Error> {
        let dir =
            TempDir::new().map_err(|e| Error::Spawn(format!("cannot create temp dir: {e}")))?;
        let qtest_path = dir.path().join("qtest.sock");
        let qmp_path = dir.path().join("qmp.sock");
        let bind = |p: &Path| -> Result<UnixListener, Error> {
            let l = UnixListener::bind(p)
                .map_err(|e| Error::Spawn(format!("cannot listen on {}: {e}", p.display())))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let qtest_listener = bind(&qtest_path)?;
        let qmp_listener = if cfg.qmp {
            Some(bind(&qmp_path)?)
        } else {
            None
        };

        let stderr_path = dir.path().join("qemu.stderr");
        let stderr = File::create(&stderr_path)
            .map_err(|e| Error::Spawn(format!("cannot create {}: {e}", stderr_path.display())))?;
        let stdout = stderr.try_clone()?;
        let cmdline = cfg.command_line(&qtest_path, cfg.qmp.then_some(qmp_path.as_path()));
        let mut cmd = Command::new(&cfg.binary);
        cmd.args(&cmdline)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        kill_child_with_parent(&mut cmd);
        let child = spawn_from_long_lived_thread(cmd).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::Spawn(format!(
                    "QEMU binary `{}` not found: {INSTALL_HINT}",
                    cfg.binary.display()
                ))
            } else {
                Error::Spawn(format!("cannot run `{}`: {e}", cfg.binary.display()))
            }
        })?;
        let process = Arc::new(Process {
            pid: child.id(),
            child: Mutex::new(child),
            stderr_path,
        });

        match connect(&cfg, &process, &qtest_listener, qmp_listener.as_ref()) {
            Ok((qtest, qmp)) => Ok(Qemu {
                qtest: Arc::new(qtest),
                qmp: qmp.map(Mutex::new),
                process,
                cmdline,
                stopped: false,
                dir,
            }),
            Err(e) => {
                process.kill();
                let _ = process.wait_exit(KILL_BOUND);
                Err(e)
            }
        }
    }

    /// The qtest client.
    pub fn qtest(&self) -> &QTest {
        &self.qtest
    }

    /// A shared handle on the qtest client, for threads that need `'static` access
    /// (e.g. an interrupt thread). It fails with [`Error::Closed`]/[`Error::Dead`] once
    /// QEMU is gone.
    pub fn qtest_handle(&self) -> Arc<QTest> {
        Arc::clone(&self.qtest)
    }

    /// Runs the QMP command `execute` with `args` (a JSON object, or `Value::Null` for
    /// none) and returns its `"return"` value; an `"error"` reply becomes
    /// [`Error::Qmp`]. Events that arrive meanwhile are queued.
    pub fn qmp(&self, execute: &str, args: Value) -> Result<Value, Error> {
        let qmp = self.qmp_conn()?;
        lock(qmp).execute(execute, args)
    }

    /// Runs an HMP (human monitor) command line through `human-monitor-command` and
    /// returns its text output.
    pub fn hmp(&self, command_line: &str) -> Result<String, Error> {
        let r = self.qmp(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        match r {
            Value::String(s) => Ok(s),
            other => Err(Error::Protocol(format!(
                "human-monitor-command returned {other}"
            ))),
        }
    }

    /// Waits up to `timeout` for the QMP event `name` (one already queued counts) and
    /// returns it, removing it from the queue. A timeout here does not kill the
    /// connection.
    pub fn wait_qmp_event(&self, name: &str, timeout: Duration) -> Result<Value, Error> {
        let qmp = self.qmp_conn()?;
        lock(qmp).wait_event(name, timeout)
    }

    /// Removes and returns every QMP event received so far, including those already
    /// sitting in the socket (no waiting).
    pub fn take_qmp_events(&self) -> Vec<Value> {
        match &self.qmp {
            Some(q) => lock(q).take_events(),
            None => Vec::new(),
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// The arguments QEMU was started with (without the binary).
    pub fn cmdline(&self) -> &[String] {
        &self.cmdline
    }

    /// The last lines of QEMU's stderr (and stdout), for diagnostics.
    pub fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }

    /// The private temp dir (sockets, QEMU's stderr); removed when `self` drops.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops QEMU like `Drop` does, but reports how it went: an error if QEMU had
    /// already died on its own (a crash), exited with a failure status, or had to be
    /// killed with SIGKILL.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn qmp_conn(&self) -> Result<&Mutex<Qmp>, Error> {
        self.qmp.as_ref().ok_or_else(|| {
            Error::Protocol("QMP is disabled (QemuConfig::qmp is false)".to_string())
        })
    }

    fn stop(&mut self) -> Result<(), Error> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let p = &self.process;
        if let Some(st) = p.try_status() {
            return Err(Error::Shutdown(format!(
                "QEMU had already died before shutdown: {}",
                p.describe_with(st)
            )));
        }
        let start = Instant::now();
        if let Some(q) = &self.qmp {
            lock(q).quit(QUIT_BOUND);
        }
        let left = QUIT_BOUND.saturating_sub(start.elapsed());
        if let Some(st) = p.wait_exit(left) {
            return check_status(p, st);
        }
        p.terminate();
        if let Some(st) = p.wait_exit(TERM_BOUND) {
            return check_status(p, st);
        }
        p.kill();
        match p.wait_exit(KILL_BOUND) {
            Some(_) => Err(Error::Shutdown(format!(
                "QEMU (pid {}) ignored quit and SIGTERM; killed with SIGKILL",
                p.pid
            ))),
            None => Err(Error::Shutdown(format!(
                "QEMU (pid {}) did not die even after SIGKILL",
                p.pid
            ))),
        }
    }
}

impl Process {
    fn describe_with(&self, st: ExitStatus) -> String {
        let tail = self.stderr_tail();
        format!(
            "QEMU (pid {}) {}; stderr tail:\n{}",
            self.pid,
            describe_status(st),
            tail
        )
    }
}

fn check_status(p: &Process, st: ExitStatus) -> Result<(), Error> {
    if st.success() {
        Ok(())
    } else {
        Err(Error::Shutdown(p.describe_with(st)))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Accepts QEMU's connections and brings both protocols up.
fn connect(
    cfg: &QemuConfig,
    process: &Arc<Process>,
    qtest_listener: &UnixListener,
    qmp_listener: Option<&UnixListener>,
) -> Result<(QTest, Option<Qmp>), Error> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut qtest_stream: Option<UnixStream> = None;
    let mut qmp_stream: Option<UnixStream> = None;
    let accept = |l: &UnixListener, slot: &mut Option<UnixStream>| -> Result<(), Error> {
        if slot.is_none() {
            match l.accept() {
                Ok((s, _)) => *slot = Some(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::Connect(format!("accept failed: {e}"))),
            }
        }
        Ok(())
    };
    loop {
        accept(qtest_listener, &mut qtest_stream)?;
        if let Some(l) = qmp_listener {
            accept(l, &mut qmp_stream)?;
        }
        if qtest_stream.is_some() && (qmp_listener.is_none() || qmp_stream.is_some()) {
            break;
        }
        if let Some(st) = process.try_status() {
            return Err(Error::Connect(format!(
                "`{}` {} before connecting; stderr tail:\n{}",
                cfg.binary.display(),
                describe_status(st),
                process.stderr_tail()
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Connect(format!(
                "QEMU (pid {}) did not connect within {} s; stderr tail:\n{}",
                process.pid,
                CONNECT_TIMEOUT.as_secs(),
                process.stderr_tail()
            )));
        }
        thread::sleep(Duration::from_millis(1));
    }

    let diag_process = Arc::clone(process);
    let diagnostics: crate::qtest::Diagnostics = Arc::new(move || diag_process.describe());
    let during_startup = |e: Error| match e {
        Error::Closed { detail, .. } => Error::Connect(detail),
        e @ Error::Timeout { .. } => Error::Connect(e.to_string()),
        e => e,
    };
    let qmp = match qmp_stream {
        Some(s) => Some(
            Qmp::handshake(s, cfg.reply_timeout, Arc::clone(&diagnostics))
                .map_err(during_startup)?,
        ),
        None => None,
    };
    let mut qtest = QTest::new(
        qtest_stream.ok_or_else(|| Error::Connect("no qtest connection".into()))?,
        cfg.reply_timeout,
    )?;
    qtest.set_diagnostics(diagnostics);
    // Completes only once machine init is done.
    qtest.raw("endianness").map_err(during_startup)?;
    Ok((qtest, qmp))
}
