//! `kabar-bench`: run one scenario against a homeserver URL and print the report.

/// The load generator shares the machine with the server it measures: with
/// tens of thousands of followers, glibc's malloc was a tenth of all CPU time
/// taken from the server under test.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use clap::{Parser, Subcommand};
use kabar_bench::{
    client::Target,
    scenarios::{Report, bigroom, idle, messages, register, roomlist, surge, todevice, versions},
};

#[derive(Parser)]
#[command(
    name = "kabar-bench",
    about = "Load scenarios for any Matrix homeserver, through the Client-Server API"
)]
struct Cli {
    /// Homeserver base URL.
    #[arg(long, default_value = "http://127.0.0.1:8008", global = true)]
    url: String,
    /// Other nodes of the same server (repeat for each): in the chat
    /// scenarios, the members of each room are spread over `--url` and
    /// these, so that messages are sent through one node and delivered
    /// through another.
    #[arg(long = "spread", global = true)]
    spread: Vec<String>,
    /// With `--spread`: send each room's messages through one node (room r
    /// through node r mod N), as a load balancer that routes a room's
    /// writes by room id does (docs/deployment.md); members still sync
    /// through their own nodes.
    #[arg(long, global = true)]
    writes_by_room: bool,
    /// Follow rooms with simplified sliding sync (MSC4186) instead of
    /// `/v3/sync` (the chat scenarios: messages, surge).
    #[arg(long, global = true)]
    sliding: bool,
    /// Sign up the benchmark's accounts without a password (no hashing):
    /// for setups of hundreds of thousands of members.
    #[arg(long, global = true)]
    passwordless: bool,
    /// Print one JSON object instead of the human summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N new accounts at concurrency C.
    Register {
        #[arg(long, default_value_t = 200)]
        accounts: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// The server's rate on its most trivial request, GET /_matrix/client/versions.
    Versions {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// U users in R rooms send for T seconds while every member long-polls /sync.
    Messages {
        #[arg(long, default_value_t = 50)]
        users: usize,
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Messages per second per sender (default: as fast as each can).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 16)]
        setup_concurrency: usize,
    },
    /// A user in R rooms opens sliding-sync connections: the first page of
    /// the room list, then the next one, N times.
    Roomlist {
        #[arg(long, default_value_t = 2000)]
        rooms: usize,
        #[arg(long, default_value_t = 50)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        setup_concurrency: usize,
    },
    /// P senders each send send-to-device messages to a partner's device for T seconds.
    Todevice {
        #[arg(long, default_value_t = 25)]
        pairs: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Messages per second per sender (default: as fast as each can).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 16)]
        setup_concurrency: usize,
    },
    /// J users join one room; K messages go to the members online.
    Bigroom {
        #[arg(long, default_value_t = 500)]
        members: usize,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        /// Milliseconds between messages (sends overlap when one takes longer).
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// The room is a broadcast channel; its last post's views are checked.
        #[arg(long)]
        channel: bool,
        /// Members who follow their sync while the messages go out (default:
        /// all); the others have joined and are offline.
        #[arg(long)]
        online: Option<usize>,
        /// Messages come from this many random members, in turns (a channel
        /// has one: its owner).
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Multiplex the online members' long-polls over HTTP/2 (cleartext,
        /// prior knowledge), from 4 source addresses.
        #[arg(long)]
        http2: bool,
    },
    /// A broadcast channel: J subscribers join, the owner posts K times to
    /// the subscribers online, every subscriber reads the last post and its
    /// view count is checked (`bigroom --channel`).
    Channel {
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        #[arg(long, default_value_t = 20)]
        posts: usize,
        /// Milliseconds between posts.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Subscribers who follow their sync while the posts go out (default: all).
        #[arg(long)]
        online: Option<usize>,
        /// Multiplex the online subscribers' long-polls over HTTP/2
        /// (cleartext, prior knowledge), from 4 source addresses: more than
        /// the ~19,000 sockets a process may open here.
        #[arg(long)]
        http2: bool,
    },
    /// S clients hold /sync long-polls; memory per client and one message to all.
    Idle {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value_t = 4)]
        sources: usize,
        /// Multiplex the long-polls over HTTP/2 (cleartext, prior knowledge).
        #[arg(long)]
        http2: bool,
        /// The server's process id, to read its resident memory.
        #[arg(long)]
        server_pid: Option<u32>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Steady chat while a crowd of newcomers tries to register at a multiple of capacity.
    Surge {
        #[arg(long, default_value_t = 50)]
        users: usize,
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        /// Messages per second per chatting user.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Seconds of sign-ups alone to measure capacity.
        #[arg(long, default_value_t = 10.0)]
        capacity_seconds: f64,
        /// Known sustained sign-ups/s (skips the measurement).
        #[arg(long)]
        capacity: Option<f64>,
        /// People signing up back to back while capacity is measured.
        #[arg(long, default_value_t = 16)]
        capacity_concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        before: f64,
        #[arg(long, default_value_t = 20.0)]
        flood: f64,
        #[arg(long, default_value_t = 15.0)]
        after: f64,
        /// Flood arrivals as a multiple of capacity.
        #[arg(long, default_value_t = 10.0)]
        multiplier: f64,
        #[arg(long, default_value_t = 16)]
        sources: usize,
        /// Seconds a newcomer waits for an answer before it counts as timed out.
        #[arg(long, default_value_t = 10.0)]
        newcomer_timeout: f64,
        /// The server's process id, to read its resident memory.
        #[arg(long)]
        server_pid: Option<u32>,
        #[arg(long, default_value_t = 16)]
        setup_concurrency: usize,
    },
}

fn print(report: &impl Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // As in the server (see its `without_transparent_huge_pages`): with huge
    // pages, zeroing fresh 2 MiB pages was a fifth of this process's samples
    // when 50,000 followers long-poll, CPU taken from the server it measures.
    // The flag is the process's, so it holds for the runtime's threads too.
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("kabar-bench: could not turn transparent huge pages off ({e})");
    }
    let cli = Cli::parse();
    let mut target = Target::new(&cli.url);
    target.others = cli.spread.clone();
    target.writes_by_room = cli.writes_by_room;
    target.sliding = cli.sliding;
    target.passwordless = cli.passwordless;
    target
        .versions()
        .await
        .map_err(|e| anyhow::anyhow!("{} is not answering: {e}", cli.url))?;
    match cli.scenario {
        Scenario::Register { accounts, concurrency } => {
            print(&register::run(&target, register::Params { accounts, concurrency }).await, cli.json)
        }
        Scenario::Roomlist {
            rooms,
            requests,
            setup_concurrency,
        } => {
            let r = roomlist::run(
                &target,
                roomlist::Params {
                    rooms,
                    requests,
                    setup_concurrency,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Versions { seconds, concurrency } => {
            print(&versions::run(&target, versions::Params { seconds, concurrency }).await, cli.json)
        }
        Scenario::Todevice {
            pairs,
            seconds,
            rate,
            setup_concurrency,
        } => {
            let r = todevice::run(
                &target,
                todevice::Params {
                    pairs,
                    seconds,
                    rate_per_sender: rate,
                    setup_concurrency,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Messages {
            users,
            rooms,
            seconds,
            rate,
            setup_concurrency,
        } => {
            let r = messages::run(
                &target,
                messages::Params {
                    users,
                    rooms,
                    seconds,
                    rate_per_sender: rate,
                    setup_concurrency,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Bigroom {
            members,
            messages,
            interval_ms,
            concurrency,
            channel,
            online,
            senders,
            http2,
        } => {
            let r = bigroom::run(
                &target,
                bigroom::Params {
                    members,
                    messages,
                    interval: Duration::from_millis(interval_ms),
                    concurrency,
                    channel,
                    online,
                    senders,
                    http2,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Channel {
            subscribers,
            posts,
            interval_ms,
            concurrency,
            online,
            http2,
        } => {
            let r = bigroom::run(
                &target,
                bigroom::Params {
                    members: subscribers + 1,
                    messages: posts,
                    interval: Duration::from_millis(interval_ms),
                    concurrency,
                    channel: true,
                    online,
                    senders: 1,
                    http2,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Idle {
            clients,
            users,
            sources,
            http2,
            server_pid,
            concurrency,
        } => {
            let r = idle::run(
                &target,
                idle::Params {
                    clients,
                    users,
                    sources,
                    http2,
                    server_pid,
                    concurrency,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
        Scenario::Surge {
            users,
            rooms,
            rate,
            capacity_seconds,
            capacity,
            capacity_concurrency,
            before,
            flood,
            after,
            multiplier,
            sources,
            newcomer_timeout,
            server_pid,
            setup_concurrency,
        } => {
            let r = surge::run(
                &target,
                surge::Params {
                    users,
                    rooms,
                    rate_per_sender: rate,
                    capacity_seconds,
                    capacity,
                    capacity_concurrency,
                    before_seconds: before,
                    flood_seconds: flood,
                    after_seconds: after,
                    multiplier,
                    sources,
                    newcomer_timeout: Duration::from_secs_f64(newcomer_timeout),
                    server_pid,
                    setup_concurrency,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            print(&r, cli.json)
        }
    }
}
