# orchestrator itself on every client node, for teams that keep it as the
# per-host layer under Nomad: one allocation per node runs the node's whole
# fleet from /etc/orchestrator/orchestrator.toml, with cgroups, restarts and
# logs as on a host of its own. Install the binary and the services on the
# nodes (or fetch them with an artifact block), then `nomad job run` this.
# Parsed as HCL2 by the tests.
job "orchestrator" {
  datacenters = ["*"]
  type        = "system"

  group "orchestrator" {
    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "orchestrator" {
      # raw_exec: the daemon makes a cgroup per service and may switch
      # users, which the exec driver's isolation would prevent. Enable
      # raw_exec on the clients that run it.
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/orchestrator"
        args    = ["-c", "/etc/orchestrator/orchestrator.toml", "run"]
      }

      # SIGTERM is the daemon's shutdown, which stops every service within
      # shutdown_timeout (30s by default): give it that and a margin.
      kill_signal  = "SIGTERM"
      kill_timeout = "60s"

      resources {
        memory = 512
      }
    }
  }
}
