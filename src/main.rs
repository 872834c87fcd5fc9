//! unpart: see README.md. Startup only; the work is in the modules.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use pingora::server::configuration::Opt;
use pingora::server::Server;
use pingora::services::listening::Service;

use unpart::{accept, admin, cli, config, drain, listener, logging, proxy, spool};

/// jemalloc, for two reasons: it gives freed memory back to the OS within seconds (glibc kept
/// 512 MB after a burst of uploads) and it samples live allocations for `/debug/pprof/heap`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol at startup (`_RJEM_MALLOC_CONF` overrides):
/// heap profiling on, one sample per 512 KiB allocated on average (lg_prof_sample:19, ~1.6 %
/// of a core per GB/s of fresh buffers); a background thread purges freed pages after 1 s.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 105] =
    b"prof:true,prof_active:true,lg_prof_sample:19,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init();

    let mut conf = match &args.conf {
        Some(path) => match config::Config::load(path) {
            Ok(c) => c,
            Err(e) => return fail(&e),
        },
        None => config::Config::default(),
    };
    if let Some(v) = &args.listen {
        conf.listen = v.clone();
    }
    if let Some(v) = &args.upstream {
        conf.upstream = v.clone();
    }
    if let Some(v) = &args.admin {
        conf.admin.listen = v.clone();
    }
    let settings = match conf.settings() {
        Ok(s) => Arc::new(s),
        Err(e) => return fail(&e),
    };
    if args.test {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let spool = if settings.spools() {
        let prepared = spool::SpoolDir::prepare(&settings.spool).and_then(|d| {
            if let Some(user) = &conf.user {
                d.hand_over(user, conf.group.as_deref())?;
            }
            Ok(d)
        });
        match prepared {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                eprintln!(
                    "unpart: spool.dir: cannot use {}: {e}",
                    settings.spool.dir.display()
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // A spool write past RLIMIT_FSIZE must fail that one request (507), not kill the process.
    // SAFETY: setting a signal's disposition to ignore, before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }

    let opt = Opt {
        upgrade: args.upgrade,
        daemon: args.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    // Register the metrics now rather than on the first request's access-log line.
    let _ = unpart::metrics::get();
    let mut server = Server::new_with_opt_and_conf(opt, conf.server_conf());
    server.bootstrap();

    let mut app = pingora::proxy::HttpProxy::new(
        proxy::Unpart::new(settings.clone(), spool),
        server.configuration.clone(),
    );
    app.handle_init_modules();
    let mut opts = pingora::apps::HttpServerOptions::default();
    // Off in pingora: accept.rs detects h2c itself (pingora's detection has no timeout).
    opts.h2c = false;
    opts.h2_idle_timeout = Some(settings.timeouts.client_keepalive.0);
    app.server_options = Some(opts);
    app.h2_options = Some(listener::h2_options());
    let mut proxy = Service::new(
        "unpart proxy".to_string(),
        accept::Accept::new(
            app,
            settings.h2c,
            settings.timeouts.client_keepalive.0,
            settings.timeouts.client_head.0,
        ),
    );
    if let Err(e) = listener::add(&mut proxy, &settings) {
        eprintln!("unpart: {e}");
        return ExitCode::FAILURE;
    }
    let mut admin = Service::new(
        "unpart admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(admin::Admin::new(settings.clone())),
    );
    admin.add_tcp(&settings.admin.listen);
    let loopback = settings
        .admin
        .listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if !loopback && settings.admin.token.is_none() {
        log::warn!(
            "the admin listener {} is not on loopback and has no admin.token: anyone who can \
             reach it can take profiles",
            settings.admin.listen
        );
    }
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(pingora::services::background::background_service(
        "drain",
        drain::Drain,
    ));
    log::info!(
        "unpart {} listening on {}, upstream {}, admin {}",
        env!("CARGO_PKG_VERSION"),
        settings.listen,
        settings.upstream,
        settings.admin.listen
    );
    server.run_forever()
}

fn fail(e: &config::ConfigError) -> ExitCode {
    eprintln!("unpart: configuration error: {e}");
    ExitCode::FAILURE
}
