//! Finds a PostgreSQL server for the demo and the tests: `DATABASE_URL` when set, else the server
//! on 127.0.0.1:5432 when it answers, else a throwaway cluster started from the installed
//! PostgreSQL binaries, stopped and deleted when dropped (or when this process dies).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;

/// A server engage-sync can create databases on.
pub struct PgServer {
    /// `postgres://user@host:port` without a database name.
    base_url: String,
    /// How it was found, for messages.
    pub origin: String,
    cluster: Option<ThrowawayCluster>,
}

impl PgServer {
    pub fn url_for(&self, database: &str) -> String {
        format!("{}/{database}", self.base_url)
    }

    /// Drops `database` if it exists and creates it empty; returns its URL. For scratch databases
    /// (demo, benchmarks): `database` must be a plain identifier.
    pub async fn recreate_database(&self, database: &str) -> anyhow::Result<String> {
        use sqlx::{Connection, Executor};
        anyhow::ensure!(
            database
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{database:?} is not a plain database name"
        );
        let mut admin = sqlx::PgConnection::connect(&self.url_for("postgres"))
            .await
            .with_context(|| format!("connecting to {} to create {database}", self.origin))?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE {database}").as_str())
            .await?;
        admin.close().await?;
        Ok(self.url_for(database))
    }

    /// Drops `database` if it exists.
    pub async fn drop_database(&self, database: &str) -> anyhow::Result<()> {
        use sqlx::{Connection, Executor};
        let mut admin = sqlx::PgConnection::connect(&self.url_for("postgres")).await?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)").as_str())
            .await?;
        admin.close().await?;
        Ok(())
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }

    /// Stops a throwaway cluster now (also done on drop).
    pub fn stop(&mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            cluster.stop();
        }
    }
}

const DEFAULT_ADDRESS: &str = "127.0.0.1:5432";

/// Finds or starts a server. Blocking: call it from `spawn_blocking` inside async code.
pub fn locate_or_start() -> anyhow::Result<PgServer> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.trim().is_empty() {
            let options = PgConnectOptions::from_str(&url)
                .context("DATABASE_URL is not a valid PostgreSQL URL")?;
            return Ok(PgServer {
                base_url: server_url_of(&url)?,
                origin: format!(
                    "DATABASE_URL ({}:{})",
                    options.get_host(),
                    options.get_port()
                ),
                cluster: None,
            });
        }
    }
    let address: SocketAddr = DEFAULT_ADDRESS.parse().expect("valid address");
    if TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok() {
        return Ok(PgServer {
            base_url: format!("postgres://postgres@{DEFAULT_ADDRESS}"),
            origin: format!("the server on {DEFAULT_ADDRESS}"),
            cluster: None,
        });
    }
    let cluster = ThrowawayCluster::start()?;
    Ok(PgServer {
        base_url: format!("postgres://postgres@127.0.0.1:{}", cluster.port),
        origin: format!(
            "a throwaway cluster on 127.0.0.1:{} ({})",
            cluster.port,
            cluster.root.display()
        ),
        cluster: Some(cluster),
    })
}

/// The URL of a database's server without the database name (keeps user, password, options).
fn server_url_of(url: &str) -> anyhow::Result<String> {
    let (scheme_and_authority, _) = match url.find("://") {
        Some(start) => {
            let after = &url[start + 3..];
            let end = after.find('/').map(|i| start + 3 + i).unwrap_or(url.len());
            (url[..end].to_owned(), ())
        }
        None => bail!("DATABASE_URL must look like postgres://user@host:port/database"),
    };
    Ok(scheme_and_authority)
}

struct ThrowawayCluster {
    root: PathBuf,
    port: u16,
    child: Arc<Mutex<Option<Child>>>,
}

impl ThrowawayCluster {
    fn start() -> anyhow::Result<Self> {
        let bin = find_server_binaries().context(
            "no PostgreSQL answers on 127.0.0.1:5432 and no PostgreSQL server binaries were found; \
             install them (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL",
        )?;
        remove_stale_clusters();
        let root = std::env::temp_dir().join(format!(
            "engage-sync-pg-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&root)?;
        let owner = unprivileged_owner()?;
        if let Some((uid, gid)) = owner {
            chown(&root, uid, gid)?;
        }
        let data = root.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let output = initdb.output().context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }

        let port = free_port()?;
        let log = std::fs::File::create(root.join("postgres.log"))?;
        if let Some((uid, gid)) = owner {
            chown(&root.join("postgres.log"), uid, gid)?;
        }
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(&root)
            // A throwaway cluster needs no durability; this makes it much faster.
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_owner(&mut postgres, owner);
        die_with_parent(&mut postgres);

        // PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits, so spawn it from
        // a thread that lives as long as the process.
        let child = Arc::new(Mutex::new(None));
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let slot = Arc::clone(&child);
        std::thread::Builder::new()
            .name("postgres-keeper".to_owned())
            .spawn(move || {
                let result = postgres.spawn();
                let outcome = match result {
                    Ok(process) => {
                        *slot.lock().expect("not poisoned") = Some(process);
                        Ok(())
                    }
                    Err(error) => Err(error),
                };
                let _ = spawned_tx.send(outcome);
                loop {
                    std::thread::park();
                }
            })?;
        spawned_rx
            .recv()
            .context("the postgres keeper thread died")?
            .context("starting postgres")?;

        let cluster = Self { root, port, child };
        let ready_by = Instant::now() + Duration::from_secs(30);
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("valid");
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if Instant::now() > ready_by {
                let log =
                    std::fs::read_to_string(cluster.root.join("postgres.log")).unwrap_or_default();
                bail!("the throwaway PostgreSQL did not start within 30 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The port opens a moment before the server accepts logins.
        std::thread::sleep(Duration::from_millis(300));
        Ok(cluster)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.lock().expect("not poisoned").take() {
            // SAFETY: sending a signal to our own child process by its pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Deletes the folders of throwaway clusters whose process is gone (a test binary cannot run
/// destructors of its statics, so its cluster folder outlives it).
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("engage-sync-pg-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn find_server_binaries() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_server(dir))
        .collect();
    versions.sort_by_key(|dir| {
        dir.parent()
            .and_then(|version| version.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| has_server(dir)))
}

/// PostgreSQL refuses to run as root; as root, run it as the `postgres` (or `nobody`) user.
fn unprivileged_owner() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let c_name = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: getpwnam reads a static entry; we copy the ids out before any other call.
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        if !entry.is_null() {
            // SAFETY: checked non-null above.
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Ok(Some((uid, gid)));
        }
    }
    bail!(
        "running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as"
    )
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::server_url_of;

    #[test]
    fn server_url_drops_the_database_only() {
        assert_eq!(
            server_url_of("postgres://u:p@db.example:6543/app?sslmode=require").unwrap(),
            "postgres://u:p@db.example:6543"
        );
        assert_eq!(
            server_url_of("postgres://postgres@127.0.0.1:5432").unwrap(),
            "postgres://postgres@127.0.0.1:5432"
        );
    }
}
