"""Enable/disable switches, persisted in ``state_dir/switches.json``.

Written atomically (temp file + rename + fsync) so a crash leaves either the
old or the new state, never a half file.  Consoles named here that are no
longer configured stay disabled if they come back: an owner's "off" should
not be undone by a config edit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("serialmuxd.switches")


@dataclass
class Switches:
    path: Path
    service_enabled: bool = True
    disabled: set[str] = field(default_factory=set)
    # who switched it off and when, for the message telling users who can enable it
    who: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Switches:
        sw = cls(path)
        try:
            data = json.loads(path.read_text())
            sw.service_enabled = bool(data.get("service_enabled", True))
            sw.disabled = {str(n) for n in data.get("disabled", [])}
            sw.who = {str(k): str(v) for k, v in data.get("who", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            # Unreadable switches: fail safe is "as configured" plus a loud log line.
            log.error("switches_unreadable", path=str(path), error=str(e))
        return sw

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {
            "service_enabled": self.service_enabled,
            "disabled": sorted(self.disabled),
            "who": self.who,
        }
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
