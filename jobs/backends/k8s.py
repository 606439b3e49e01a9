"""Names, label keys and reserved numbers shared by the backends, the grid, the templates and ``submit``/``status``.

One module, so a label the templates write and a selector ``status`` reads can
never drift apart (the habit of Katib's SDK ``constants.py``).
"""

from __future__ import annotations

import re

from ..cell.errors import ExitCode

# ---- names -------------------------------------------------------------------
APP_NAME = "critbatch"
NAME_PREFIX = "critbatch"
#: Kubernetes object names that become DNS labels (Job -> pod hostname, Services of PyTorchJob/JobSet).
MAX_NAME = 63
#: Label values are limited to 63 characters as well.
MAX_LABEL_VALUE = 63
#: An RFC 1123 DNS label (object names, the sweep); the length limit is MAX_NAME, checked apart.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: A label value: empty, or alphanumerics at both ends with -, _ and . between; at most MAX_LABEL_VALUE.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CONTAINER_NAME = "critbatch"
DEFAULT_NAMESPACE = "critbatch"
DEFAULT_SERVICE_ACCOUNT = "critbatch"
DEFAULT_IMAGE = "critbatch:latest"
DEFAULT_STORE = "s3://critbatch/runs"
#: The Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the store (k8s/store-secret.example.yaml).
DEFAULT_STORE_SECRET = "critbatch-store"
#: The kit's SeaweedFS S3 Service (k8s/seaweedfs.yaml), reachable by short name from the same namespace.
DEFAULT_STORE_ENDPOINT = "http://critbatch-s3:8333"
#: Suffix of the analysis Job's name: critbatch-<sweep>-analysis.
ANALYSIS_SUFFIX = "analysis"
#: ``critbatch-<sweep>-search``: the search controller's Job, ServiceAccount, Role and RoleBinding.
SEARCH_SUFFIX = "search"

# ---- label keys ------------------------------------------------------------------
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SWEEP = "critbatch.io/sweep"
LABEL_CELL = "critbatch.io/cell-id"
#: The resource class of an Indexed Job (backend indexed): the cells that share its pod.
LABEL_RESOURCE_CLASS = "critbatch.io/resource-class"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
#: The Kueue WorkloadPriorityClass of a queued object's Workload (Kueue v0.20 serves kueue.x-k8s.io/v1beta2 only;
#: the two labels are the same in every version).
LABEL_WORKLOAD_PRIORITY = "kueue.x-k8s.io/priority-class"
COMPONENT_CELL = "cell"
COMPONENT_ANALYSIS = "analysis"
COMPONENT_SEARCH = "search"

# ---- condition types read back by submit and status (each backend names its own, jobs/backends) --------
CONDITION_FAILED = "Failed"
CONDITION_SUSPENDED = "Suspended"

# ---- the container -----------------------------------------------------------------
#: The exit codes of a cell that retrying cannot help (ExitCode.permanent: bad configuration, no CUDA device
#: where one was asked for), as plain numbers for the templates: the cell Job fails at once on them, as the
#: TrainJob runtime does (k8s/trainer); all are below 128, which the PyTorchJob's ExitCode restart policy
#: treats as permanent.
EXIT_CODES_PERMANENT = tuple(int(code) for code in ExitCode if code.in_pod and code.permanent)
#: Every cell pod's command: the launcher (jobs/train/launch.py), which takes torchrun's arguments but exits
#: with the trainer's code (torchrun itself exits 1 whatever its worker returned).
LAUNCH_COMMAND = ("python", "-m", "critbatch.jobs.train.launch")
#: Seconds before the kubelet's SIGKILL (terminationGracePeriodSeconds) at which the launcher kills workers
#: still checkpointing after a SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch's default is 30 s).
SHUTDOWN_MARGIN_SECONDS = 10
#: Scratch directories on the read-only root filesystem: (volume name, mount path, environment variable).
SCRATCH_DIRS = (
    ("tmp", "/tmp", "TMPDIR"),
    ("home", "/home/critbatch", "HOME"),
    ("mplconfig", "/var/cache/critbatch/matplotlib", "MPLCONFIGDIR"),
    ("inductor-cache", "/var/cache/critbatch/torchinductor", "TORCHINDUCTOR_CACHE_DIR"),
    ("triton-cache", "/var/cache/critbatch/triton", "TRITON_CACHE_DIR"),
)
#: The image's non-root user (images/Dockerfile creates it with this uid/gid).
RUN_AS_USER = 1000
RUN_AS_GROUP = 1000


def object_name(sweep: str, suffix: str) -> str:
    """``critbatch-<sweep>-<suffix>``: the name of a cell's object (suffix = cell id) or the analysis Job."""
    return f"{NAME_PREFIX}-{sweep}-{suffix}"


def cell_selector(sweep: str) -> str:
    """Label selector of every cell object of a sweep."""
    return f"{LABEL_SWEEP}={sweep},{LABEL_COMPONENT}={COMPONENT_CELL}"
