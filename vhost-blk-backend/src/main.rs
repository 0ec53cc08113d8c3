//! vhost-blk-backend's `main`: the command line (`cli`) turned into a running device, or a
//! client subcommand. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_blk_backend::cli::{Args, Cmd, CopyModeArg};
use vhost_blk_backend::control::BlkControl;
use vhost_blk_backend::dirty::DirtyBitmap;
use vhost_blk_backend::dirty_file::{DirtyFile, Loaded};
use vhost_blk_backend::migration::client::{self, MigrateArgs};
use vhost_blk_backend::migration::dest::serve_incoming;
use vhost_blk_backend::migration::job::Migrations;
use vhost_blk_backend::migration::tls::TlsCreds;
use vhost_blk_backend::migration::transport::{self, Security};
use vhost_blk_backend::shared::SyncState;
use vhost_blk_backend::throttle_client;
use vhost_blk_backend::{BlkDevice, BlkOptions, Disk};
use vhost_user_device::engine::EngineKind;
use vhost_user_device::program::backend_main;
use vhost_user_device::sandbox::{self, ThreadKind};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(cmd) = args.command.take() {
        return client(cmd);
    }
    backend_main(
        args.listen.print_capabilities,
        r#"{"type": "block", "features": ["read-only", "blk-file"]}"#,
        || run(args),
    )
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.listen.sandbox(vhost_blk_backend::seccomp::profile(
        args.dirty_bitmap.is_some(),
    ))?;
    // Checked before anything is opened (the names in the message are set-io-throttle's).
    let limits = args.io_limits()?;
    let path = args.blk_file.ok_or("--blk-file is required")?;
    let mut disk = Disk::open(&path, args.read_only, args.cache, args.block_size)?;
    disk.choose_engine(args.io_engine)?;
    if disk.engine == EngineKind::Mapped {
        // Process-wide, and before any thread's seccomp filter forbids rt_sigaction.
        if let Err(e) = vhost_user_device::engine::sigbus::install() {
            log::warn!("cannot catch SIGBUS ({e}): the disk will not be mapped");
        }
    }
    let serial = args.serial.unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    log::info!(
        "serving {} ({} bytes, {}, I/O engine {}{}, block size {}) on {} queue(s) of {}",
        path.display(),
        disk.size,
        if disk.direct { "O_DIRECT" } else { "buffered" },
        disk.engine,
        if disk.read_only { ", read-only" } else { "" },
        args.block_size,
        args.num_queues,
        args.queue_size
    );
    let (dirty, dirty_file) = match &args.dirty_bitmap {
        Some(file) => {
            let (f, bitmap, checkpoint, loaded) =
                DirtyFile::open(file, disk.size, args.dirty_granularity)?;
            let incomplete = loaded == Loaded::Incomplete;
            let id = checkpoint.image_uuid();
            let generation = checkpoint.generation;
            match loaded {
                Loaded::Created => {
                    log::info!("{}: new dirty bitmap, image id {id}", file.display())
                }
                Loaded::Trusted => log::info!(
                    "{}: image id {id}, generation {generation}, {} bytes changed since",
                    file.display(),
                    bitmap.dirty_bytes()
                ),
                Loaded::AllDirty(why) => log::warn!(
                    "{}: {why}; the whole disk counts as changed for the next sync \
                     (image id {id}, generation {generation})",
                    file.display()
                ),
                Loaded::Incomplete if args.incoming.is_none() => {
                    return Err(format!(
                        "{}: an incoming block migration to {} did not complete, so the image \
                         is neither the old disk nor the new one; refusing to serve it. Run \
                         with --incoming to take a sync.",
                        file.display(),
                        path.display()
                    )
                    .into())
                }
                Loaded::Incomplete => log::warn!(
                    "{}: an earlier incoming sync did not complete; waiting for a full one",
                    file.display()
                ),
            }
            (Arc::new(bitmap), Some((f, checkpoint, incomplete)))
        }
        None => (
            Arc::new(DirtyBitmap::new(disk.size, args.dirty_granularity)?),
            None,
        ),
    };
    let device = BlkDevice::new(
        disk,
        &BlkOptions {
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            block_size: args.block_size,
            serial,
            poll_us: args.poll_us,
            dirty: Some(dirty.clone()),
            pin_guest_memory: args.pin_guest_memory,
        },
    );
    let shared = device.shared().clone();
    shared.set_io_limits(limits);
    if !limits.unlimited() {
        log::info!("I/O limits: {limits:?}");
    }
    if let Some((f, checkpoint, incomplete)) = dirty_file {
        *shared.sync.lock().unwrap_or_else(|e| e.into_inner()) = SyncState {
            checkpoint,
            file: Some(f),
            incomplete,
        };
    }
    let security = Security {
        insecure: args.migration_insecure,
        tls: args.tls_creds.as_deref().map(TlsCreds::new),
    };
    if let (Some(t), Some(_)) = (&security.tls, &args.listen.control_socket) {
        t.check(false)?;
    }
    // Bind the migration address before anything else, so a bad one fails at start.
    let incoming = match &args.incoming {
        Some(uri) => {
            shared.gate.close();
            if let Some(t) = &security.tls {
                t.check(true)?;
            }
            Some(transport::listen(uri, &security)?)
        }
        None => None,
    };
    let shutdown = Shutdown::new()?;
    // Before any other thread exists, so every thread inherits the blocked signals.
    handle_termination_signals(shutdown.clone())?;
    let listener = args.listen.listener()?;
    if let Some(mut l) = incoming {
        let shared = shared.clone();
        log::info!("waiting for the incoming block migration; guest requests are held");
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || {
                sandbox::enter_or_exit(ThreadKind::Job);
                if let Err(e) = serve_incoming(&shared, &mut l) {
                    log::error!("incoming block migration: {e}");
                }
            })?;
    }
    let server = Server::new(Arc::new(device), shutdown);
    // The migration commands are only reachable through the control socket.
    let migrations = args.listen.control_socket.is_some().then(|| {
        Arc::new(Migrations::new(
            shared.clone(),
            security.clone(),
            std::time::Duration::from_millis(args.downtime_limit),
        ))
    });
    let control = match &migrations {
        Some(m) => args.listen.start_control(
            "vhost-blk-backend",
            env!("CARGO_PKG_VERSION"),
            server.state(),
            Arc::new(BlkControl::new(shared.clone(), m.clone())),
        )?,
        None => None,
    };
    if let (Some(m), Some(c)) = (&migrations, &control) {
        m.set_events(c.events());
    }
    // Metrics only read counters: a job list nobody can start jobs on will do.
    let _metrics = args.listen.start_metrics(
        "vhost-blk-backend",
        env!("CARGO_PKG_VERSION"),
        server.state(),
        Arc::new(BlkControl::new(
            shared.clone(),
            Arc::new(Migrations::new(
                shared.clone(),
                security.clone(),
                std::time::Duration::from_millis(args.downtime_limit),
            )),
        )),
    )?;
    server.serve(&listener)?;
    // Every request has completed (serve drains before it returns): the bitmap is
    // complete, and the file may say so.
    let st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = &st.file {
        f.save_with(&dirty, &st.checkpoint, false, st.incomplete)
            .map_err(|e| format!("saving the dirty bitmap {}: {e}", f.path().display()))?;
    }
    log::info!("exiting");
    Ok(())
}

/// The subcommands: a client of a running backend's control socket.
fn client(cmd: Cmd) -> ExitCode {
    let r = match cmd {
        Cmd::Common(c) => return c.run(),
        Cmd::Migrate {
            control_socket,
            to,
            incremental,
            copy_mode,
            max_bandwidth,
            wait,
        } => client::migrate(
            &control_socket,
            &MigrateArgs {
                to,
                incremental,
                copy_mode: match copy_mode {
                    CopyModeArg::Background => "background",
                    CopyModeArg::WriteBlocking => "write-blocking",
                },
                max_bandwidth,
                wait,
            },
        ),
        Cmd::MigrateStatus {
            control_socket,
            json,
        } => client::status(&control_socket, json),
        Cmd::MigrateCancel { control_socket } => client::simple(&control_socket, "migrate-cancel"),
        Cmd::MigrateComplete { control_socket } => {
            client::simple(&control_socket, "migrate-complete")
        }
        Cmd::SetIoThrottle(a) => throttle_client::run(&a).map(|()| true).map_err(Into::into),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
