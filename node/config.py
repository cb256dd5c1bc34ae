"""NodeConfig: the one typed configuration object, validated once at start-up.

Every knob of a node lives here with its default. The CLI builds it from flags (and
ROLLSHARE_* environment variables, for containers); nothing deeper reads the environment.
`validate()` turns every bad value into a `ConfigError` whose message says what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([1-9][0-9]{0,4})$")
_MULTIADDR = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[^/]+/tcp/[0-9]{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]+$")


class ConfigError(ValueError):
    """A configuration value a person must fix; the message says how."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "rollshare"


DEFAULT_P2P_PORT = 4101
DEFAULT_GRPC_PORT = 4102


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    # policy
    model: str = "tiny"  # an embedded size (tiny-s, tiny, tiny-m), "smollm2", or a model directory
    warmup_steps: int = 300
    lr: float = 2e-4
    # tasks and rounds
    tasks: str = "chain_sum"  # family mix "name[:weight],..."
    prompt_style: str = "compact"
    rounds: int = 0  # 0 = run until stopped
    prompts_per_round: int = 16  # I: own groups per round
    shared_groups: int = 0  # J: shared groups per round (needs the swarm)
    sapo_strategy: str = "paper"  # how shared groups are picked and used (rollshare.sapo.STRATEGIES)
    shared_window_s: float = 0.0  # age limit of shared groups; 0 = the store's max age
    offpolicy_shaping: float = 0.1  # γ of LUFFY's f(p)=p/(p+γ) for injected peer tokens; 0 = ratio 1
    warmup_tasks: str = ""  # warm-up mix of the embedded model ("" = --tasks); specialists differ
    group_size: int = 8  # G: completions per question
    max_new_tokens: int = 5
    temperature: float = 1.0
    reward_fn: str = ""  # "module:function" with TRL's signature, replaces the verifier
    # generation method (rollshare.accel): "auto" = the selector picks each round, or a method name
    gen_method: str = "auto"
    gen_history: str = ""  # measurement history ("" = <data_dir>/accel/history.jsonl)
    allow_lossy_rollouts: bool = False  # lossy methods (int8, half precision) may generate training rollouts
    # GRPO
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    max_grad_norm: float = 1.0
    # persistence
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # misc
    seed: int = 0
    threads: int = 0  # torch threads; 0 = all cores
    json_log: str = ""
    status: str = "auto"  # "auto" (live line on a terminal), "line" (a line per N rounds), "off"
    # swarm (a node is a swarm member unless network is False)
    network: bool = True
    listen_host: str = "0.0.0.0"
    p2p_port: int = DEFAULT_P2P_PORT  # 0 = any free port
    grpc_port: int = DEFAULT_GRPC_PORT  # 0 = any free port
    advertise_host: str = ""  # host in the gRPC endpoint peers fetch from ("" = this machine's address)
    bootstrap: tuple[str, ...] = ()  # multiaddrs /ip4/H/tcp/P/p2p/ID or host:port gRPC addresses
    identity: str = ""  # ed25519 key file ("" = <data_dir>/identity.key)
    mdns: bool = False
    reconcile_interval_s: float = 2.0

    def with_(self, **kw) -> "NodeConfig":
        return replace(self, **kw)

    @property
    def identity_path(self) -> Path:
        return Path(self.identity).expanduser() if self.identity else Path(self.data_dir).expanduser() / "identity.key"

    def validate(self) -> "NodeConfig":
        from rollshare.tasks import TaskError, parse_mix
        from rollshare.policies.tiny import SIZES

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

        for n in ("prompts_per_round", "max_new_tokens", "checkpoint_every", "keep_checkpoints"):
            positive(n)
        for n in ("rounds", "warmup_steps", "threads", "beta", "seed", "shared_groups"):
            positive(n, allow_zero=True)
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"--lr must be in (0, 1), got {self.lr}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ConfigError("--eps-low must be in [0, 1) and --eps-high >= 0")
        if self.prompt_style not in ("compact", "full"):
            raise ConfigError(f"--prompt-style must be 'compact' or 'full', got {self.prompt_style!r}")
        if self.status not in ("auto", "line", "off"):
            raise ConfigError(f"--status must be auto, line or off, got {self.status!r}")
        try:
            parse_mix(self.tasks)
        except TaskError as e:
            raise ConfigError(f"--tasks: {e}") from None
        if self.warmup_tasks:
            try:
                parse_mix(self.warmup_tasks)
            except TaskError as e:
                raise ConfigError(f"--warmup-tasks: {e}") from None
        from rollshare.sapo import STRATEGIES

        if self.sapo_strategy not in STRATEGIES:
            raise ConfigError(f"--sapo-strategy must be one of {', '.join(STRATEGIES)}, got {self.sapo_strategy!r}")
        if self.shared_window_s < 0 or self.offpolicy_shaping < 0:
            raise ConfigError("--shared-window and --offpolicy-shaping must be >= 0")
        if self.model not in SIZES and self.model != "smollm2":
            p = Path(self.model).expanduser()
            if not p.is_dir():
                raise ConfigError(f"--model {self.model!r} is neither an embedded size ({', '.join(SIZES)}), "
                                  "'smollm2', nor an existing model directory")
            if not (p / "config.json").is_file():
                raise ConfigError(f"--model {p} has no config.json; point it at a directory written by save_pretrained")
        from rollshare.accel.methods import REGISTRY

        if self.gen_method != "auto" and self.gen_method not in REGISTRY:
            raise ConfigError(f"--gen-method must be 'auto' or one of {', '.join(REGISTRY)}, got {self.gen_method!r}")
        if self.reward_fn and ":" not in self.reward_fn:
            raise ConfigError(f"--reward-fn must look like 'package.module:function', got {self.reward_fn!r}")
        d = Path(self.data_dir).expanduser()
        if d.exists() and not d.is_dir():
            raise ConfigError(f"--data-dir {d} exists and is not a directory")
        if self.json_log:
            parent = Path(self.json_log).expanduser().resolve().parent
            if not parent.is_dir():
                raise ConfigError(f"--json-log: directory {parent} does not exist")
        self._validate_network()
        return self

    def _validate_network(self) -> None:
        for name in ("p2p_port", "grpc_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be a port in 0..65535 (0 = any free port), got {v}")
        if self.p2p_port and self.p2p_port == self.grpc_port:
            raise ConfigError(f"--p2p-port and --grpc-port are both {self.p2p_port}; give them different ports")
        try:
            ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise ConfigError(f"--listen-host must be an IP address of this machine (0.0.0.0 = all), "
                              f"got {self.listen_host!r}") from None
        if self.advertise_host and not _HOST.match(self.advertise_host):
            raise ConfigError(f"--advertise-host must be a host name or IP address, got {self.advertise_host!r}")
        for addr in self.bootstrap:
            m = _HOST_PORT.match(addr)
            if not (_MULTIADDR.match(addr) or m and int(m.group(3)) <= 65535):
                raise ConfigError(f"--bootstrap {addr!r} is neither a multiaddr like /ip4/1.2.3.4/tcp/4101/p2p/12D3KooW... "
                                  f"nor a gRPC address like host:{DEFAULT_GRPC_PORT}")
        if not self.reconcile_interval_s > 0:
            raise ConfigError(f"--reconcile-interval must be > 0 seconds, got {self.reconcile_interval_s}")
        if self.shared_groups and not self.network:
            raise ConfigError("--shared-groups needs the swarm; drop --no-network or use --shared-groups 0")


def config_fields() -> list[str]:
    return [f.name for f in fields(NodeConfig)]
