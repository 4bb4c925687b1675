//! The task that runs one service process's health check on its schedule
//! and tells the service's actor each change of verdict.
//!
//! The rules:
//!
//! - The verdict starts `unknown`, which is never sent: only changes are.
//! - Until the first pass the service is still starting: failures never
//!   make it unhealthy (the actor's start_timeout is what bounds a start),
//!   and checks run every min(interval, 1 s) so that readiness is seen
//!   soon. The first pass sends `healthy`.
//! - After that, checks run every `interval`, counted from the end of one
//!   check to the start of the next (a slow probe never piles up checks).
//!   `retries` consecutive failures send `unhealthy`, with the last failure
//!   as its detail. A failure of a check started within `start_period` of
//!   the monitor's start does not count (nor break a run of failures). A
//!   pass sends `healthy` again, and starts the count afresh.
//! - The first check waits an offset in [0, min(interval, 1 s)) derived
//!   from the service's name: deterministic, and different for each name,
//!   so that a thousand services started together are spread over that
//!   window instead of all checked at once.
//! - Each check has its own deadline (`timeout`): a probe that hangs fails
//!   then ("timed out after …") and never stalls the monitor beyond it.
//! - It runs until aborted (the actor aborts it when the process ends: one
//!   monitor per process, started with it) or until the actor's receiver
//!   is gone.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::probe::{self, ExecContext, ProbeError};
use super::{Health, HealthCheck, HealthReport, Probe};

/// While a service is starting, it is checked at least this often.
const STARTING_INTERVAL: Duration = Duration::from_secs(1);

/// Carries out one check. The real one is `probe::check`; tests plug in
/// their own, which need no network and obey tokio's paused clock.
pub trait Prober: Send + 'static {
    /// One check; the monitor gives up on it after `timeout` whatever it
    /// does, but a probe with something to clean up (a process group to
    /// kill) should keep that deadline itself.
    fn check(&mut self, timeout: Duration) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

/// The probes of `probe::check`, for one service process.
#[derive(Debug, Clone)]
pub struct ProbeRunner {
    pub probe: Probe,
    pub exec: ExecContext,
}

impl Prober for ProbeRunner {
    fn check(&mut self, timeout: Duration) -> impl Future<Output = Result<(), ProbeError>> + Send {
        probe::check(&self.probe, timeout, &self.exec)
    }
}

/// Run `check` for `service`'s running process (see the module's rules),
/// sending each change of verdict to `reports`. Abort the handle when the
/// process ends.
/// `gates_readiness`: the first pass makes the service up (no notify), so
/// failures before it do not count (the start is bounded by start_timeout);
/// with notify, READY=1 does that, and failures count from the start (after
/// start_period), or a check that never passes could never be unhealthy.
pub fn spawn_monitor(
    service: String,
    check: HealthCheck,
    exec: ExecContext,
    reports: UnboundedSender<HealthReport>,
    gates_readiness: bool,
) -> JoinHandle<()> {
    let prober = ProbeRunner {
        probe: check.probe.clone(),
        exec,
    };
    spawn_monitor_with(service, check, prober, reports, gates_readiness)
}

/// `spawn_monitor` with the checks carried out by `prober` (`check.probe`
/// is not looked at).
pub fn spawn_monitor_with<P: Prober>(
    service: String,
    check: HealthCheck,
    prober: P,
    reports: UnboundedSender<HealthReport>,
    gates_readiness: bool,
) -> JoinHandle<()> {
    tokio::spawn(run(service, check, prober, reports, gates_readiness))
}

async fn run<P: Prober>(
    service: String,
    check: HealthCheck,
    mut prober: P,
    reports: UnboundedSender<HealthReport>,
    gates_readiness: bool,
) {
    let mut tracker = Tracker::new(&check, Instant::now(), gates_readiness);
    let window = check.interval.min(STARTING_INTERVAL);
    if !pause(spread(&service, window), &reports).await {
        return;
    }
    let mut spread_over_interval = false;
    loop {
        let started = Instant::now();
        let result = tokio::time::timeout(check.timeout, prober.check(check.timeout))
            .await
            .unwrap_or(Err(ProbeError::TimedOut(check.timeout)));
        if let Err(error) = &result {
            tracing::debug!(service = %service, "health check failed: {error}");
        }
        if let Some(report) = tracker.record(result, started)
            && reports.send(report).is_err()
        {
            return;
        }
        // The first verdict of 1000 services started together comes within
        // about a second; once, each waits its own share of the interval,
        // so that from then on their checks are spread over all of it.
        let delay = if !spread_over_interval && tracker.verdict != Health::Unknown {
            spread_over_interval = true;
            spread(&service, check.interval)
        } else {
            tracker.next_delay()
        };
        if !pause(delay, &reports).await {
            return;
        }
    }
}

/// Wait `delay`; false when the receiver is gone meanwhile.
async fn pause(delay: Duration, reports: &UnboundedSender<HealthReport>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = reports.closed() => false,
    }
}

/// The first check's offset for `service`: in [0, `window`), from a hash
/// of its name, in whole milliseconds (tokio's timers have no finer
/// grain). FNV-1a rather than std's hasher, whose output may change
/// between Rust releases: the spread should not.
fn spread(service: &str, window: Duration) -> Duration {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if window == 0 {
        return Duration::ZERO;
    }
    let hash = service
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    Duration::from_millis(hash % window)
}

/// The verdict from the results so far: the rules of the module, without
/// a clock or a task.
#[derive(Debug)]
struct Tracker {
    retries: u32,
    interval: Duration,
    /// Failures of checks started before this do not count.
    counts_from: Instant,
    verdict: Health,
    /// Consecutive failures that count, since the last pass.
    failures: u32,
    /// The first pass makes the service up: failures before it don't count.
    gates_readiness: bool,
}

impl Tracker {
    fn new(check: &HealthCheck, started: Instant, gates_readiness: bool) -> Tracker {
        Tracker {
            retries: check.retries.max(1),
            interval: check.interval,
            counts_from: started + check.start_period,
            verdict: Health::Unknown,
            failures: 0,
            gates_readiness,
        }
    }

    /// The result of a check started `at`; the report to send, if the
    /// verdict changed.
    fn record(&mut self, result: Result<(), ProbeError>, at: Instant) -> Option<HealthReport> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.change(Health::Healthy, None)
            }
            // Still starting: its start_timeout is the actor's business.
            Err(_) if self.gates_readiness && self.verdict == Health::Unknown => None,
            Err(_) if at < self.counts_from => None,
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures < self.retries {
                    return None;
                }
                self.change(Health::Unhealthy, Some(error.to_string()))
            }
        }
    }

    fn change(&mut self, health: Health, detail: Option<String>) -> Option<HealthReport> {
        if self.verdict == health {
            return None;
        }
        self.verdict = health;
        Some(HealthReport { health, detail })
    }

    /// From the end of a check to the start of the next.
    fn next_delay(&self) -> Duration {
        match self.verdict {
            Health::Unknown => self.interval.min(STARTING_INTERVAL),
            Health::Healthy | Health::Unhealthy => self.interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::sync::mpsc;

    use super::*;
    use crate::health::OnUnhealthy;
    use crate::process::{ExitReason, FakeSpawner, SpawnSpec};

    const SECOND: Duration = Duration::from_secs(1);

    fn health_check(interval: Duration, retries: u32, start_period: Duration) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp {
                address: "127.0.0.1:1".to_owned(),
            },
            interval,
            timeout: SECOND,
            retries,
            start_period,
            on_unhealthy: OnUnhealthy::Restart,
        }
    }

    fn failed(reason: &str) -> Result<(), ProbeError> {
        Err(ProbeError::Failed(reason.to_owned()))
    }

    fn healthy() -> Option<HealthReport> {
        Some(HealthReport {
            health: Health::Healthy,
            detail: None,
        })
    }

    fn unhealthy(detail: &str) -> Option<HealthReport> {
        Some(HealthReport {
            health: Health::Unhealthy,
            detail: Some(detail.to_owned()),
        })
    }

    // --- Tracker ------------------------------------------------------------

    #[test]
    fn without_readiness_by_check_failures_count_from_the_start() {
        let start = Instant::now();
        let mut tracker = Tracker::new(&health_check(5 * SECOND, 2, Duration::ZERO), start, false);
        let failed = || Err(ProbeError::Failed("status 500".into()));
        assert_eq!(tracker.record(failed(), start), None);
        let report = tracker.record(failed(), start + SECOND).unwrap();
        assert_eq!(report.health, Health::Unhealthy);
    }

    #[test]
    fn failures_before_the_first_pass_never_count() {
        let start = Instant::now();
        let mut tracker = Tracker::new(&health_check(5 * SECOND, 1, Duration::ZERO), start, true);
        assert_eq!(tracker.next_delay(), SECOND, "starting: every second");
        for n in 0..10 {
            assert_eq!(tracker.record(failed("no"), start + n * SECOND), None);
        }
        assert_eq!(tracker.verdict, Health::Unknown);
        assert_eq!(tracker.record(Ok(()), start + 10 * SECOND), healthy());
        assert_eq!(tracker.next_delay(), 5 * SECOND);
        // Those failures were not kept: one more is the first of a run.
        let mut three = Tracker::new(&health_check(5 * SECOND, 3, Duration::ZERO), start, true);
        three.record(failed("a"), start);
        three.record(failed("b"), start);
        three.record(Ok(()), start);
        assert_eq!(three.record(failed("c"), start), None);
    }

    #[test]
    fn retries_consecutive_failures_make_it_unhealthy_and_a_pass_heals() {
        let start = Instant::now();
        let mut tracker = Tracker::new(&health_check(5 * SECOND, 3, Duration::ZERO), start, true);
        assert_eq!(tracker.record(Ok(()), start), healthy());
        assert_eq!(tracker.record(Ok(()), start), None, "only changes");
        assert_eq!(tracker.record(failed("a"), start), None);
        assert_eq!(tracker.record(failed("b"), start), None);
        assert_eq!(tracker.record(Ok(()), start), None, "the run is broken");
        assert_eq!(tracker.record(failed("c"), start), None);
        assert_eq!(tracker.record(failed("d"), start), None);
        assert_eq!(tracker.record(failed("e"), start), unhealthy("e"));
        assert_eq!(tracker.record(failed("f"), start), None, "only changes");
        assert_eq!(tracker.next_delay(), 5 * SECOND);
        assert_eq!(tracker.record(Ok(()), start), healthy());
        assert_eq!(tracker.record(failed("g"), start), None, "counted afresh");
    }

    #[test]
    fn failures_within_the_start_period_do_not_count() {
        let start = Instant::now();
        let period = 10 * SECOND;
        let mut tracker = Tracker::new(&health_check(SECOND, 1, period), start, true);
        assert_eq!(tracker.record(Ok(()), start), healthy());
        let inside = start + period - Duration::from_millis(1);
        assert_eq!(tracker.record(failed("early"), inside), None);
        assert_eq!(tracker.verdict, Health::Healthy);
        assert_eq!(
            tracker.record(failed("late"), start + period),
            unhealthy("late")
        );
        // Nor does one inside it break a run of failures that count.
        let mut two = Tracker::new(&health_check(SECOND, 2, period), start, true);
        two.record(Ok(()), start);
        two.record(failed("ignored"), inside);
        assert_eq!(two.record(failed("1"), start + period), None);
        assert_eq!(two.record(failed("2"), start + period), unhealthy("2"));
    }

    #[test]
    fn the_spread_is_deterministic_and_spread() {
        let window = SECOND;
        assert_eq!(spread("api", window), spread("api", window));
        let offsets: std::collections::BTreeSet<Duration> = (0..1000)
            .map(|n| spread(&format!("svc@{n}"), window))
            .collect();
        assert!(offsets.iter().all(|&offset| offset < window));
        // A thousand names in a thousand milliseconds: about 1 - 1/e of
        // them are taken when the hash spreads as it should.
        assert!(offsets.len() > 550, "{} distinct", offsets.len());
        // Each tenth of the window gets some.
        for tenth in 0..10 {
            let (low, high) = (window * tenth / 10, window * (tenth + 1) / 10);
            let n = offsets.iter().filter(|&&o| o >= low && o < high).count();
            assert!((35..=100).contains(&n), "{n} in tenth {tenth}");
        }
        let short = Duration::from_millis(200);
        assert!(spread("api", short) < short);
        assert_eq!(spread("api", Duration::ZERO), Duration::ZERO);
    }

    // --- the task, on a paused clock -----------------------------------------

    /// What a scripted check does.
    #[derive(Debug, Clone)]
    enum Step {
        Pass,
        Fail(&'static str),
        /// Takes this long, then passes.
        Slow(Duration),
        /// Never answers.
        Hang,
    }

    /// Plays `steps` in order, then `Pass` forever; records when each
    /// check started.
    #[derive(Clone, Default)]
    struct Script {
        steps: Arc<Mutex<VecDeque<Step>>>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Script {
        fn new(steps: &[Step]) -> Script {
            Script {
                steps: Arc::new(Mutex::new(steps.iter().cloned().collect())),
                calls: Arc::default(),
            }
        }

        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Prober for Script {
        fn check(
            &mut self,
            _timeout: Duration,
        ) -> impl Future<Output = Result<(), ProbeError>> + Send {
            self.calls.lock().unwrap().push(Instant::now());
            let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Pass);
            async move {
                match step {
                    Step::Pass => Ok(()),
                    Step::Fail(reason) => failed(reason),
                    Step::Slow(duration) => {
                        tokio::time::sleep(duration).await;
                        Ok(())
                    }
                    Step::Hang => std::future::pending().await,
                }
            }
        }
    }

    struct Running {
        start: Instant,
        offset: Duration,
        script: Script,
        reports: mpsc::UnboundedReceiver<HealthReport>,
        handle: JoinHandle<()>,
    }

    impl Running {
        fn start(check: HealthCheck, steps: &[Step]) -> Running {
            let script = Script::new(steps);
            let (sender, reports) = mpsc::unbounded_channel();
            let window = check.interval.min(STARTING_INTERVAL);
            let start = Instant::now();
            let handle = spawn_monitor_with("svc".to_owned(), check, script.clone(), sender, true);
            Running {
                start,
                offset: spread("svc", window),
                script,
                reports,
                handle,
            }
        }

        /// The next report, and how long after the monitor's start it came.
        async fn next(&mut self) -> (HealthReport, Duration) {
            let report = self.reports.recv().await.expect("the monitor runs");
            (report, self.start.elapsed())
        }

        /// When each check started, from the monitor's start.
        fn call_times(&self) -> Vec<Duration> {
            let calls = self.script.calls();
            calls.iter().map(|&at| at - self.start).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn starting_checks_every_second_until_the_first_pass() {
        let check = health_check(5 * SECOND, 3, Duration::ZERO);
        let mut running = Running::start(check, &[Step::Fail("a"), Step::Fail("b"), Step::Pass]);
        let o = running.offset;
        assert!(o > Duration::ZERO && o < SECOND, "{o:?}");
        let (report, at) = running.next().await;
        assert_eq!(Some(report), healthy());
        assert_eq!(at, o + 2 * SECOND);
        assert_eq!(running.call_times(), [o, o + SECOND, o + 2 * SECOND]);
        // Then, after its share of the interval once, every interval; and
        // nothing sent while it stays healthy.
        let p = spread("svc", 5 * SECOND);
        tokio::time::sleep(11 * SECOND).await;
        assert!(running.reports.try_recv().is_err());
        let times = running.call_times();
        assert_eq!(&times[3..5], [o + 2 * SECOND + p, o + 7 * SECOND + p]);
        running.handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn retries_failures_send_unhealthy_and_a_pass_healthy() {
        let check = health_check(5 * SECOND, 2, Duration::ZERO);
        let steps = [
            Step::Pass,
            Step::Fail("a"),
            Step::Fail("b"),
            Step::Fail("c"),
        ];
        let mut running = Running::start(check, &steps);
        let o = running.offset;
        let p = spread("svc", 5 * SECOND);
        let (report, at) = running.next().await;
        assert_eq!((Some(report), at), (healthy(), o));
        let (report, at) = running.next().await;
        assert_eq!(Some(report), unhealthy("b"));
        assert_eq!(at, o + p + 5 * SECOND);
        // "c" changes nothing; the pass after it does.
        let (report, at) = running.next().await;
        assert_eq!(Some(report), healthy());
        assert_eq!(at, o + p + 15 * SECOND);
        running.handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_period_is_counted_from_the_monitors_start() {
        let p = spread("svc", 5 * SECOND);
        let check = health_check(5 * SECOND, 1, p + 12 * SECOND);
        let steps = [
            Step::Pass,
            Step::Fail("early"),
            Step::Fail("early"),
            Step::Fail("early"),
            Step::Fail("late"),
        ];
        let mut running = Running::start(check, &steps);
        let o = running.offset;
        assert_eq!(Some(running.next().await.0), healthy());
        // Checks at o+p, o+p+5 and o+p+10 start within p+12 s; o+p+15 does not.
        let (report, at) = running.next().await;
        assert_eq!((Some(report), at), (unhealthy("late"), o + p + 15 * SECOND));
        running.handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_probe_fails_at_its_timeout() {
        let check = health_check(5 * SECOND, 1, Duration::ZERO);
        let mut running = Running::start(check, &[Step::Pass, Step::Hang, Step::Pass]);
        let o = running.offset;
        let p = spread("svc", 5 * SECOND);
        running.next().await;
        let (report, at) = running.next().await;
        assert_eq!(Some(report), unhealthy("timed out after 1s"));
        assert_eq!(at, o + p + SECOND);
        // The next check starts an interval after that one gave up.
        let (report, at) = running.next().await;
        assert_eq!((Some(report), at), (healthy(), o + p + 6 * SECOND));
        running.handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_runs_from_the_end_of_a_check() {
        let check = health_check(5 * SECOND, 1, Duration::ZERO);
        let slow = Duration::from_millis(800);
        let mut running = Running::start(check, &[Step::Slow(slow), Step::Slow(slow)]);
        let o = running.offset;
        let p = spread("svc", 5 * SECOND);
        let (_, at) = running.next().await;
        assert_eq!(at, o + slow);
        // Past the third check's start (o + 2·slow + p + 5 s).
        tokio::time::sleep(11 * SECOND).await;
        let times = running.call_times();
        assert_eq!(
            &times[..3],
            [o, o + slow + p, o + 2 * slow + p + 5 * SECOND]
        );
        running.handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_monitor_ends_when_the_receiver_is_gone() {
        let check = health_check(5 * SECOND, 1, Duration::ZERO);
        let running = Running::start(check, &[]);
        drop(running.reports);
        tokio::time::timeout(60 * SECOND, running.handle)
            .await
            .expect("ended")
            .unwrap();
        // It noticed while waiting, not at its next check.
        assert!(running.script.calls().len() <= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn exec_probes_run_through_the_spawner_with_the_services_spec() {
        let spawner = FakeSpawner::new();
        spawner.set_probe_exit(Some(ExitReason::Exited(0)));
        let spec = SpawnSpec {
            service: "svc".to_owned(),
            program: "/srv/svc/svc".into(),
            args: vec!["--port".to_owned(), "1".to_owned()],
            env: vec![("A".into(), "1".into())],
            cwd: "/srv/svc/data".into(),
            sha256: Some(crate::config::Sha256([7; 32])),
            ..SpawnSpec::default()
        };
        let exec = ExecContext {
            spawner: Arc::new(spawner.clone()),
            spec: spec.clone(),
            cgroup: None,
        };
        let check = HealthCheck {
            probe: Probe::Exec {
                argv: vec!["check".to_owned(), "--quick".to_owned()],
            },
            ..health_check(5 * SECOND, 1, Duration::ZERO)
        };
        let (sender, mut reports) = mpsc::unbounded_channel();
        let handle = spawn_monitor("svc".to_owned(), check, exec, sender, true);
        assert_eq!(reports.recv().await, healthy());
        let probe = &spawner.probe_specs()[0];
        assert_eq!(probe.program, std::path::Path::new("check"));
        assert_eq!(probe.args, ["--quick"]);
        assert_eq!((&probe.env, &probe.cwd), (&spec.env, &spec.cwd));
        assert_eq!(probe.sha256, None);
        assert_eq!(spawner.probe_cgroups(), [None]);
        assert_eq!(spawner.spawn_count(), 0, "no service spawn");
        spawner.set_probe_exit(Some(ExitReason::Exited(4)));
        assert_eq!(reports.recv().await, unhealthy("exec exited with code 4"));
        handle.abort();
    }
}
