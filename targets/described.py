"""Device targets g3n describes to IREE itself, for devices IREE 3.13 has no description of.

iree-compile takes a whole `#hal.device.target<...>` as `--iree-hal-target-device`; inside it,
`#iree_gpu.target` states what one workgroup processor offers (compute and storage bit widths,
subgroup size and operations, matrix intrinsics, limits), as IREE's own descriptions do.
"""

from __future__ import annotations


def device_target_flag(device: str, backend: str, fmt: str, arch: str, features: str, **wgp) -> str:
    """`--iree-hal-target-device=` for one executable target; `wgp` fields as IREE spells them, lists of
    intrinsic names for `mma`."""
    fields = []
    for key, value in wgp.items():
        if key == "mma":
            value = "[" + ", ".join(f"<{m}>" for m in value) + "]"
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(map(str, value)) + "]"
        fields.append(f"{key} = {value}")
    target = f'#iree_gpu.target<arch = "{arch}", features = "{features}", wgp = <{", ".join(fields)}>>'
    return (f'--iree-hal-target-device=#hal.device.target<"{device}", [#hal.executable.target<"{backend}", '
            f'"{fmt}", {{iree_codegen.target_info = {target}}}>]> : !hal.device')
