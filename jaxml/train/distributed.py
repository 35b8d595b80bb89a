"""Multi-host start-up: `jax.distributed.initialize` when launched on several processes."""
from __future__ import annotations

import os

import jax

# Explicit launch (any platform, e.g. several CPU processes on one machine):
#   JAXML_COORDINATOR_ADDRESS=host:port JAXML_NUM_PROCESSES=n JAXML_PROCESS_ID=i
ENV_COORDINATOR = "JAXML_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXML_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXML_PROCESS_ID"


def _auto_detectable_cluster() -> bool:
  """True on launchers whose environment `jax.distributed.initialize()` reads by itself."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # multi-host Cloud TPU VM slice
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` if this is a multi-process launch.

  Arguments win over the `JAXML_*` environment variables above; with neither,
  a multi-host TPU VM / SLURM / Open MPI launch is auto-detected by JAX. On the
  CPU backend the gloo collectives are selected (needed for cross-process
  all-reduce). Must run before any other JAX call that touches devices.
  Returns True if distributed mode was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs num_processes and process_id too "
                     f"(got num_processes={num_processes}, process_id={process_id})")
  if explicit and num_processes == 1:
    return False
  if not explicit and not _auto_detectable_cluster():
    return False
  # Only affects the CPU backend; harmless on TPU/GPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  return True
