"""Configuration of one worker process (`chaos worker --config FILE`), the identity a
worker's certificate carries (`member_uri`), and the admission its party's worker CA signs
(`Admission`): whoever issues certificates and admissions (the operator, `chaos run`) and the
worker that checks them share these."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

MAX_SEED = 2**53 - 1
"""The largest seed: the largest integer every JSON reader (the API server's schema bounds
included) holds exactly; torch seeds with 64 bits."""
BUCKET_BYTES = 4 << 20
MAX_BUCKET_BYTES = 1 << 30
MAX_MICRO_BATCH = 1 << 24
MAX_STATE_BYTES = 16 << 30


MEMBER_ID = r"[A-Za-z0-9_.-]+"
PARTY = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
NAMED_MEMBER = r"[A-Za-z0-9.-][A-Za-z0-9_.-]*"
"""A member id a certificate (or an admission) may name: none that starts with `_`."""
MEMBER_URI = re.compile(rf"chaos://(?P<party>{PARTY})/(?P<member>{NAMED_MEMBER})")
"""A worker certificate's identity: the URI SAN `chaos://<party>/<member id>`. No certificate
names an id that starts with `_`: such names label links, not members (`net/tls.py`)."""


def member_uri(party: str, member: str) -> str:
    """The URI SAN naming `member` of `party` (ValueError if either is not a valid name)."""
    uri = f"chaos://{party}/{member}"
    if not MEMBER_URI.fullmatch(uri):
        raise ValueError(f"party {party!r} or member id {member!r} is not a valid name")
    return uri


SIGNATURE = ec.ECDSA(hashes.SHA256())
"""How seals (`net.signing`) and admissions are signed: ECDSA P-256 with SHA-256."""


def key_sha256(key: x509.Certificate | PublicKeyTypes) -> str:
    """The SHA-256 (hex) of the DER SubjectPublicKeyInfo of `key`, or of a certificate's key:
    the key an admission is bound to (`Admission.key_sha256`); a party's pinned operator key
    is this with `sha256:` before it (`chaos_operator.federation.identity`)."""
    if isinstance(key, x509.Certificate):
        key = key.public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


JOB = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}"
"""A job's name in an admission: the ChaosJob's (or its federation's), or a local run's."""
ADMISSION_DOMAIN = b"chaos admission v1\n"
"""Prefixed to the bytes an admission signs, so that no other signature of a worker CA's
key (a certificate's) can pass for one."""
MAX_ADMISSION_BYTES = 4096
"""The largest admission file read (one is about 400 bytes)."""
MAX_WALL_S = 2**53 - 1


class Admission(BaseModel):
    """Its party's word that `member`, holding the key whose SubjectPublicKeyInfo hashes to
    `key_sha256` (`key_sha256()`: the key of the certificate issued with it), may join `job`
    from `not_before` to `not_after` (Unix seconds): signed (`sig`, base64 DER ECDSA) by the
    worker CA of `party`, the operator's for pods, the run's for `chaos run`. A joiner
    carries it in its join proposals; every member checks it (`membership.joiners`) against
    the CA it trusts for that party, the joiner's certificate (names and key) and its own
    job. Every field is required: an admission of before the key binding is none."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    job: str = Field(pattern=rf"^{JOB}$")
    party: str = Field(max_length=63, pattern=rf"^{PARTY}$")
    member: str = Field(max_length=253, pattern=rf"^{NAMED_MEMBER}$")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    not_before: int = Field(ge=0, le=MAX_WALL_S)
    not_after: int = Field(ge=0, le=MAX_WALL_S)
    sig: str = Field(default="", max_length=128, pattern=r"^[A-Za-z0-9+/=]*$")

    def signed_bytes(self) -> bytes:
        """What the CA signs: a domain prefix, then the admission's JSON without `sig`
        (deterministic for a model, so a receiver computes the same bytes)."""
        return ADMISSION_DOMAIN + self.model_dump_json(exclude={"sig"}).encode()

    def sign(self, key: ec.EllipticCurvePrivateKey) -> Admission:
        """This admission signed by the worker CA's `key`."""
        sig = base64.b64encode(key.sign(self.signed_bytes(), SIGNATURE)).decode()
        return self.model_copy(update={"sig": sig})

    def signed_by(self, key: ec.EllipticCurvePublicKey) -> bool:
        """Whether `sig` is the signature of the CA whose public key is `key`."""
        try:
            key.verify(base64.b64decode(self.sig, validate=True), self.signed_bytes(), SIGNATURE)
        except (InvalidSignature, ValueError):
            return False
        return True

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after


def read_admission(path: str) -> Admission:
    """The admission in file `path` (ValueError, saying why, if it cannot be read or is none)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ADMISSION_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the admission {path}: {exc.strerror}") from None
    if len(data) > MAX_ADMISSION_BYTES:
        raise ValueError(f"the admission {path} is over {MAX_ADMISSION_BYTES} bytes")
    try:
        return Admission.model_validate_json(data)
    except ValidationError as exc:
        fields = sorted({".".join(map(str, e["loc"])) or "(file)" for e in exc.errors()})
        raise ValueError(f"{path} is no admission (bad {', '.join(fields)})") from None


class TlsFiles(BaseModel):
    """PEM files of a worker's mutual TLS (`chaos_worker.net.tls`), and its admission."""

    model_config = ConfigDict(extra="forbid")

    cert: str = Field(description="this worker's certificate (URI SAN chaos://PARTY/ID)")
    key: str = Field(description="its private key")
    ca: str = Field(description="the CA bundle every peer's certificate must chain to")
    admission: str | None = Field(
        None,
        max_length=4096,
        description="this worker's admission (JSON, `Admission`) signed by its party's worker "
        "CA: carried in its join proposals, and its job is the one joiners must be admitted "
        "to (None: a config of before admissions; joiners are then not checked)",
    )


class WorkerConfig(BaseModel):
    """Everything one member needs; the launcher or the operator writes it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, pattern=rf"^{MEMBER_ID}$")
    listen: str = Field("127.0.0.1:0", description="host:port to accept peers on")
    entry: str = Field(description="module:factory of the training job")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="model and sample order seed")
    global_batch: PositiveInt = 64
    steps: PositiveInt = 100
    dtype: Literal["float32", "float64"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    micro_batch: int = Field(
        64,
        ge=1,
        le=MAX_MICRO_BATCH,
        description="most samples one forward and backward pass takes; a member's share of a "
        "step is cut into micro-batches of this size and their gradients summed (memory only: "
        "the step's gradient is the same)",
    )
    heartbeat_interval_s: PositiveFloat = 0.1
    failure_timeout_s: PositiveFloat = 1.0
    bucket_bytes: int = Field(
        BUCKET_BYTES,
        ge=1024,
        le=MAX_BUCKET_BYTES,
        description="all-reduce bucket; also the largest gradient chunk accepted",
    )
    max_state_bytes: PositiveInt = Field(
        MAX_STATE_BYTES,
        description="largest training state accepted from a peer (a copy join's state, a "
        "step's total streamed to a newcomer, a snapshot shard)",
    )
    members: dict[str, str] = Field(
        default_factory=dict, description="initial members id -> host:port (empty to join)"
    )
    overlay: dict[str, float] | None = Field(
        None, description="link 'a|b' -> bandwidth; default: every pair of members"
    )
    join: str | None = Field(None, description="host:port of a member to join through")
    control: str | None = Field(
        None, description="the launcher's control socket: host:port, or unix:PATH"
    )
    standby: bool = Field(
        False,
        description="start up, then wait for the order to join: the launcher's join command "
        "(local runs), or a new config in standby_file (a spare pod)",
    )
    standby_file: str | None = Field(
        None,
        max_length=4096,
        description="a standby re-reads this file (its pod's projected config) until it holds "
        "the same config with standby false and join set, then joins through that member",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus /metrics here (0: any port; None: off)"
    )

    links: str = Field(
        "", description="emulated link shapes, e.g. 'w0-w3=20MB/s+40ms,*=100MB/s' (shaping.py)"
    )
    kernel_shaped: bool = Field(
        False,
        description="the rates of `links` are enforced by tc (network-namespace testbed): "
        "the transport adds only their delays",
    )
    downlink_bytes_per_s: PositiveFloat | None = Field(
        None, description="emulated downlink of this worker (all incoming bytes share it)"
    )
    termination_log: str | None = Field(
        None,
        max_length=4096,
        description='write `{"step": N}` (the last step completed) here on exit: the '
        "container's terminationMessagePath in a pod (None: nowhere)",
    )
    snapshot_dir: str | None = Field(
        None,
        description="memory-backed directory for snapshots, served by a separate replicator "
        "(default with `replicator: process`: a private directory in /dev/shm, or in the "
        "temporary directory when /dev/shm has no room for the slots); the worker stops "
        "if it has no room for them",
    )
    replicator: Literal["process", "inline"] = Field(
        "process",
        description="process: serve snapshots from a child `chaos replicator` process, so "
        "serving never competes with training for this interpreter; inline: from this "
        "process's event loop (ignored with replicator_address)",
    )
    replicator_address: str | None = Field(
        None,
        description="host:port of a replicator already serving snapshot_dir (the pod's "
        "sidecar container): advertised to newcomers, and nothing is served from here",
    )
    join_mode: Literal["observe", "copy"] = Field(
        "observe",
        description="observe: pull a snapshot from several members while replaying the "
        "gradient stream; copy: full-state copy from one member at the switch step",
    )
    join_strategy: Literal["greedy", "single", "equal", "proportional"] = Field(
        "greedy", description="how the root splits a join's snapshot among the sources"
    )
    shard_overhead_s: float = Field(
        5e-4, ge=0, description="per-shard cost the planner adds to each source (seconds)"
    )
    stall_timeout_s: PositiveFloat = Field(
        5.0, description="a source that sends nothing for this long is replaced mid-join"
    )
    join_probe_frames: int = Field(
        0,
        ge=0,
        le=64,
        description="frames of 64 KiB a newcomer pulls from each member to time its downlink "
        "before asking to join (0, the default: no probe; the root plans with measured, "
        "shaped or default rates and the pull re-plans from the rates it measures)",
    )
    state_quorum: int = Field(
        1,
        ge=1,
        le=2,
        description="members whose seals must agree on the state a newcomer takes (with "
        "TLS): 1, as many as the join has, up to two; 2, always two, so that one hostile "
        "member can never hand a newcomer its own state, and a job with a single incumbent "
        "admits no newcomer",
    )
    observer_max_backlog: PositiveInt = Field(
        200, description="observed steps a newcomer may lag before it falls back to a copy"
    )
    checkpoint_dir: str | None = Field(
        None,
        description="durable directory for checkpoints (a volume that outlives the pod); the "
        "root of the view writes them there (None: no checkpoints)",
    )
    checkpoint_every_steps: PositiveInt | None = Field(
        100, description="write a checkpoint every this many steps (None: not by steps)"
    )
    checkpoint_every_s: PositiveFloat | None = Field(
        None, description="also write one when this many seconds have passed since the last"
    )
    checkpoint_keep: PositiveInt = Field(3, description="checkpoints kept: the newest ones")
    checkpoint_writer: Literal["root", "self"] = Field(
        "root",
        description="root: the root of the view writes (every member has the directory); "
        "self: this member writes whenever it trains (the operator mounts a party's volume "
        "in one member only)",
    )
    resume_from: str | None = Field(
        None,
        description="an initial member starts from this checkpoint, or from the newest one "
        "that verifies in this checkpoint directory, instead of step 0",
    )
    resume_required: bool = Field(
        True,
        description="False: a resume_from directory without a checkpoint that verifies "
        "starts at step 0 instead of failing (the operator's initial sets after every member "
        "was lost, maybe before the first checkpoint)",
    )
    tls: TlsFiles | None = Field(
        None,
        description="mutual TLS 1.3 on every link of this worker and its replicator, the "
        "peer's member id taken from its certificate (None: plaintext, anyone may connect)",
    )

    @model_validator(mode="after")
    def _members_or_join(self) -> WorkerConfig:
        ordered = self.control or self.standby_file  # where a standby's order comes from
        if not self.members and not self.join and not (self.standby and ordered):
            raise ValueError("either members (initial worker) or join (newcomer) is required")
        if self.members and self.id not in self.members:
            raise ValueError(f"members must include this worker's id {self.id!r}")
        if self.replicator_address and not self.snapshot_dir:
            raise ValueError("replicator_address needs the snapshot_dir it serves")
        if self.heartbeat_interval_s >= self.failure_timeout_s:
            raise ValueError("heartbeat_interval_s must be smaller than failure_timeout_s")
        return self
