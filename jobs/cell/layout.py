"""Where a sweep's objects live in the store (design section 5).

    <store>/<sweep>/sweep.yaml
    <store>/<sweep>/cells/<cell-id>/{cell.json, steps/, evals/, checkpoint/, _SUCCESS, _FAILED}
    <store>/<sweep>/cells/<cell-id>/checkpoint/step-NNNNNNNNNN/{state.pt, COMPLETE}
    <store>/<sweep>/report/...
"""

from __future__ import annotations

import re

from .inputs import shown

#: Store URL used when none is given.
DEFAULT_STORE = "./critbatch-out"


def cell_prefix(sweep: str, cell_id: str) -> str:
    return f"{sweep}/cells/{cell_id}"


def success_key(sweep: str, cell_id: str) -> str:
    return f"{cell_prefix(sweep, cell_id)}/_SUCCESS"


def failed_key(sweep: str, cell_id: str) -> str:
    """``_FAILED``: the cell's object failed on the cluster (JSON: reason, object, when). Written by
    ``critbatch submit``/``status``, so a failure outlives the Job's TTL; ``submit --retry-failed`` removes it."""
    return f"{cell_prefix(sweep, cell_id)}/_FAILED"


#: A checkpoint counts only once this file is in its folder (written after ``state.pt``).
CHECKPOINT_COMPLETE = "COMPLETE"
#: The trainer's state dict (torch.save) in a checkpoint's folder.
CHECKPOINT_STATE = "state.pt"


def checkpoint_dir(prefix: str, step: int) -> str:
    """The folder of the checkpoint after ``step`` updates under a cell's ``prefix`` (a kept one outlives
    ``_SUCCESS``: branches start from it)."""
    return f"{prefix}/checkpoint/step-{step:010d}"


def report_prefix(sweep: str) -> str:
    return f"{sweep}/report"


#: A sweep's name: a DNS-1123 label, since it names Kubernetes objects and store prefixes.
SWEEP_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

#: S3's rules for a general purpose bucket's name (AWS "Bucket naming rules"; MinIO and SeaweedFS follow
#: them): 3 to 63 lower-case letters, digits, dots and hyphens, a letter or digit at both ends.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"))


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name, or None."""
    if not _BUCKET.match(bucket):
        return (f"bucket {shown(bucket)} is not an S3 bucket name: 3 to 63 characters of lower-case letters, digits, "
                "'.' and '-', starting and ending with a letter or digit")
    if ".." in bucket or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        return f"bucket {shown(bucket)} is not an S3 bucket name: no '..' and not an IP address"
    if bucket.startswith(_BUCKET_RESERVED[0]) or bucket.endswith(_BUCKET_RESERVED[1]):
        return f"bucket {shown(bucket)} is not an S3 bucket name: it starts or ends with a prefix or suffix S3 reserves"
    return None


def store_problem(url: str) -> str | None:
    """Why ``url`` is not a store this code can open (s3://BUCKET[/PREFIX], file://DIR or a path), or None."""
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].split("/")[0]
        if not bucket:
            return f"{shown(url)} names no bucket; expected s3://BUCKET[/PREFIX]"
        return bucket_problem(bucket)
    if "://" in url and not url.startswith("file://"):
        return f"unsupported scheme in {shown(url)}; allowed: s3://BUCKET/PREFIX, file://DIR or a path"
    if not url.strip() or url == "file://":
        return "empty; allowed: s3://BUCKET/PREFIX, file://DIR or a path"
    return None


def sweep_problem(name: str) -> str | None:
    """Why ``name`` is not a sweep's name (a DNS-1123 label of at most 63 characters), or None."""
    if len(name) <= 63 and re.fullmatch(SWEEP_NAME, name):
        return None
    return (f"{shown(name)} is not a sweep name: a DNS-1123 label (lower-case letters, digits and '-', starting "
            "and ending with a letter or digit, at most 63 characters) such as cifar10-resnet34")
