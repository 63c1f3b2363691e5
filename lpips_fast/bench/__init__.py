"""Benchmarks shipped with the package (`lpips-fast bench`): `model` (lpips_fast against the
official lpips, eager and compiled, per case and by resolution), `kernels` (the fused head
against the reference head per layer shape), `dirs` (folders of image files scored end to
end as whole processes against plain loops of other packages; `plain_loops` holds those
loops), and what they share: `common` (device names, interleaved timing, plot style) and
`limits` (the work of a case and the peak rates of known devices). benchmarks/bench.py,
bench_head.py and bench_dirs.py are thin wrappers over these."""
