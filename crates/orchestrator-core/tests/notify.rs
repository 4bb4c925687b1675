//! The sd_notify listener with real processes and its real socket: who is
//! listened to (the leader, its process group, its cgroup) and who is not,
//! and sd_notify_barrier's guarantee.
//!
//! The senders are this test binary run again as a helper (the
//! `helper_process` test, which does nothing unless NOTIFY_HELPER is set):
//! the core crate cannot use the e2e crate's fixture, and a helper of our
//! own needs no tool from the host. A sender that exits may be gone before
//! the listener looks it up, so each one ends with a barrier (BARRIER=1
//! with a descriptor, which the listener closes once it has handled what
//! came before) and exits only after that: whether it was accepted never
//! depends on timing.

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::cgroup::fake::FakeController;
use orchestrator_core::cgroup::{ResourceController, ServiceCgroup};
use orchestrator_core::notify::{
    MAX_DATAGRAM, NotifyReport, NotifySocket, environment, spawn_listener,
};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinHandle;

/// Only turns a hang into a failure: a loaded CI machine never gets near it.
const DEADLINE: Duration = Duration::from_secs(20);

/// NOTIFY_HELPER: "park" waits for its stdin to close; "send" sends
/// NOTIFY_TEXT to NOTIFY_SOCKET and then waits on a barrier.
#[test]
fn helper_process() {
    match std::env::var("NOTIFY_HELPER").as_deref() {
        Ok("park") => {
            let mut sink = Vec::new();
            std::io::stdin().read_to_end(&mut sink).unwrap();
        }
        Ok("send") => {
            let address = std::env::var("NOTIFY_SOCKET").unwrap();
            let text = std::env::var("NOTIFY_TEXT").unwrap();
            let socket = connect(&address);
            socket.send(text.as_bytes()).unwrap();
            barrier(&socket);
        }
        _ => {}
    }
}

fn connect(address: &str) -> UnixDatagram {
    let name = address.strip_prefix('@').expect("an abstract address");
    let address = SocketAddr::from_abstract_name(name).unwrap();
    let socket = UnixDatagram::unbound().unwrap();
    socket.connect_addr(&address).unwrap();
    socket
}

/// sd_notify_barrier: send the write end of a pipe, keep none of our own,
/// and wait for the read end's EOF, which comes when the receiver closes it.
fn barrier(socket: &UnixDatagram) {
    let (mut read, write) = std::io::pipe().unwrap();
    let fds = [write.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(b"BARRIER=1")],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    drop(write);
    let mut rest = Vec::new();
    read.read_to_end(&mut rest).unwrap();
}

fn helper(mode: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "helper_process", "--quiet", "--test-threads=1"])
        .env("NOTIFY_HELPER", mode)
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A process that leads its own group and sends nothing: some other
/// service's leader, as far as the listener can tell.
fn park() -> Child {
    helper("park")
        .stdin(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// A process that sends `text` to `socket` and exits after its barrier.
fn sender(socket: &str, text: &str) -> Command {
    let mut command = helper("send");
    command
        .env("NOTIFY_SOCKET", socket)
        .env("NOTIFY_TEXT", text)
        .stdin(Stdio::null());
    command
}

async fn wait_success(mut child: Child) {
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the sender's barrier returned")
        .unwrap();
    assert!(status.success(), "the sender failed: {status}");
}

struct Listening {
    address: String,
    reports: UnboundedReceiver<NotifyReport>,
    task: JoinHandle<()>,
}

impl Listening {
    /// Listens on `socket` for the service led by `leader_pid`.
    fn on(
        socket: NotifySocket,
        leader_pid: u32,
        cgroup: Option<Arc<dyn ServiceCgroup>>,
    ) -> Listening {
        let address = socket.address().to_owned();
        let (sender, reports) = unbounded_channel();
        let task = spawn_listener(
            socket,
            "itest".into(),
            leader_pid,
            cgroup,
            Some(Duration::from_secs(3600)),
            sender,
        );
        Listening {
            address,
            reports,
            task,
        }
    }

    fn start(leader_pid: u32, cgroup: Option<Arc<dyn ServiceCgroup>>) -> Listening {
        Listening::on(NotifySocket::bind("itest").unwrap(), leader_pid, cgroup)
    }

    async fn next(&mut self) -> NotifyReport {
        tokio::time::timeout(DEADLINE, self.reports.recv())
            .await
            .expect("a report within the deadline")
            .expect("the listener runs")
    }

    /// A report that must be there already (a barrier has returned).
    fn already(&mut self) -> NotifyReport {
        self.reports
            .try_recv()
            .expect("handled before the barrier returned")
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn own_pid() -> u32 {
    std::process::id()
}

#[tokio::test]
async fn a_datagram_from_outside_the_service_is_rejected() {
    let mut leader = park();
    let mut listening = Listening::start(leader.id().unwrap(), None);
    let socket = connect(&listening.address);
    socket.send(b"READY=1\nSTATUS=forged").unwrap();
    assert_eq!(
        listening.next().await,
        NotifyReport::Rejected {
            pid: Some(own_pid())
        }
    );
    // Ours came first and was not acted on: the next report is about the
    // next datagram.
    socket.send(b"READY=1").unwrap();
    assert_eq!(
        listening.next().await,
        NotifyReport::Rejected {
            pid: Some(own_pid())
        }
    );
    drop(leader.stdin.take());
    leader.wait().await.unwrap();
}

#[tokio::test]
async fn a_member_of_the_leaders_process_group_is_listened_to() {
    let mut leader = park();
    let leader_pid = leader.id().unwrap();
    let mut listening = Listening::start(leader_pid, None);
    let member = sender(&listening.address, "READY=1")
        .process_group(leader_pid as i32)
        .spawn()
        .unwrap();
    assert_ne!(member.id(), Some(leader_pid));
    wait_success(member).await;
    assert_eq!(listening.already(), NotifyReport::Ready);
    drop(leader.stdin.take());
    leader.wait().await.unwrap();
}

#[tokio::test]
async fn the_leaders_status_reaches_the_receiver() {
    // As the service's actor does it: bind, spawn with the environment,
    // then listen with the pid the spawn gave. What the leader sent
    // meanwhile waits in the socket.
    let socket = NotifySocket::bind("itest").unwrap();
    let (key, address) = environment(&socket, None).remove(0);
    assert_eq!(&*key, "NOTIFY_SOCKET");
    let leader = sender(&address, "STATUS=warming up\nREADY=1")
        .process_group(0)
        .spawn()
        .unwrap();
    let mut listening = Listening::on(socket, leader.id().unwrap(), None);
    wait_success(leader).await;
    assert_eq!(
        listening.already(),
        NotifyReport::Status("warming up".into())
    );
    assert_eq!(listening.already(), NotifyReport::Ready);
}

#[tokio::test]
async fn a_process_of_the_services_cgroup_is_listened_to() {
    let mut leader = park();
    let controller = FakeController::default();
    let placement = controller.create("itest", &Default::default()).unwrap();
    // As a process that left the group with setsid would be: in the cgroup
    // only.
    controller
        .cgroup("itest")
        .unwrap()
        .set_pids(vec![leader.id().unwrap(), own_pid()]);
    let mut listening = Listening::start(leader.id().unwrap(), placement.cgroup);
    let socket = connect(&listening.address);
    socket.send(b"READY=1").unwrap();
    assert_eq!(listening.next().await, NotifyReport::Ready);
    drop(leader.stdin.take());
    leader.wait().await.unwrap();
}

#[tokio::test]
async fn an_oversize_datagram_is_dropped_whole() {
    let mut listening = Listening::start(own_pid(), None);
    let socket = connect(&listening.address);
    let mut big = b"STATUS=".to_vec();
    big.resize(MAX_DATAGRAM + 1, b'x');
    socket.send(&big).unwrap();
    socket.send(b"STATUS=small").unwrap();
    // It blocks until the listener, on this runtime, has run.
    tokio::task::spawn_blocking(move || barrier(&socket))
        .await
        .unwrap();
    assert_eq!(listening.already(), NotifyReport::Status("small".into()));
    assert!(
        listening.reports.try_recv().is_err(),
        "nothing of the big one"
    );
}

#[tokio::test]
async fn a_stranger_is_rejected_even_as_a_group_leader_with_a_barrier() {
    let mut leader = park();
    let mut listening = Listening::start(leader.id().unwrap(), None);
    let stranger = sender(&listening.address, "READY=1")
        .process_group(0)
        .spawn()
        .unwrap();
    let stranger_pid = stranger.id().unwrap();
    // A rejected datagram's descriptors are closed too: its barrier returns.
    wait_success(stranger).await;
    for _ in 0..2 {
        assert_eq!(
            listening.already(),
            NotifyReport::Rejected {
                pid: Some(stranger_pid)
            }
        );
    }
    assert!(listening.reports.try_recv().is_err());
    drop(leader.stdin.take());
    leader.wait().await.unwrap();
}
