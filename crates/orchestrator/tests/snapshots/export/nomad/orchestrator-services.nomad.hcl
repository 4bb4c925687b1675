# not carried over: chatty: backoff approximated: restart's delay is fixed at the initial one; Nomad has no growing delay within a group's restarts
# not carried over: chatty: data_dir approximated: the exec driver runs the task in its allocation directory; HOME still names the data_dir
# not carried over: chatty: depends_on.steady dropped: it has no health check naming a port, so no service to wait for: the groups start together
# not carried over: flaky: restart approximated: Nomad restarts a service task whatever its exit code (a batch job's would not be restarted after exit 0)
# not carried over: flaky: backoff approximated: restart's delay is fixed at the initial one; Nomad has no growing delay within a group's restarts
# not carried over: flaky: data_dir approximated: the exec driver runs the task in its allocation directory; HOME still names the data_dir
# not carried over: steady: backoff approximated: restart's delay is fixed at the initial one; Nomad has no growing delay within a group's restarts
# not carried over: steady: data_dir approximated: the exec driver runs the task in its allocation directory; HOME still names the data_dir
# Exported from orchestrator: one group per service.
job "orchestrator-services" {
  datacenters = ["*"]
  type        = "service"

  group "chatty" {
    count = 1

    restart {
      attempts = 10
      interval = "70s"
      delay    = "1s"
      mode     = "fail"
    }

    task "chatty" {
      driver = "exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "2s"

      config {
        command = "@REPO@/examples/services/chatty/chatty"
        args    = ["--service", "chatty", "--log-level", "info"]
      }

      env {
        HOME = "@REPO@/examples/services/chatty/data"
        PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        TEMP = "/tmp"
        TMP = "/tmp"
        TMPDIR = "/tmp"
      }
    }
  }

  group "flaky" {
    count = 1

    restart {
      attempts = 5
      interval = "32500ms"
      delay    = "500ms"
      mode     = "fail"
    }

    task "flaky" {
      driver = "exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "5s"

      config {
        command = "@REPO@/examples/services/flaky/flaky"
        args    = ["--service", "flaky", "--log-level", "info"]
      }

      env {
        CRASH_AFTER = "2"
        HOME = "@REPO@/examples/services/flaky/data"
        PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        TEMP = "/tmp"
        TMP = "/tmp"
        TMPDIR = "/tmp"
      }
    }
  }

  group "steady" {
    count = 1

    restart {
      attempts = 10
      interval = "70s"
      delay    = "1s"
      mode     = "fail"
    }

    task "steady" {
      driver = "exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "5s"

      config {
        command = "@REPO@/examples/services/steady/steady"
        args    = ["--service", "steady", "--log-level", "info", "--greeting", "hello"]
      }

      env {
        HOME = "@REPO@/examples/services/steady/data"
        PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        STEADY_MODE = "demo"
        TEMP = "/tmp"
        TMP = "/tmp"
        TMPDIR = "/tmp"
      }

      service {
        name = "steady"

        check {
          type     = "script"
          interval = "2s"
          timeout  = "1s"
          command  = "test"
          args     = ["-e", "ready"]

          check_restart {
            limit = 3
            grace = "0s"
          }
        }
      }
    }
  }
}
