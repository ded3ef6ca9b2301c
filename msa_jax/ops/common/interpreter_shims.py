"""Interpret-mode shims for the Mosaic GPU interpreter (CPU tests only; never on a GPU).

They patch private ``jax._src`` interpreter callbacks, so they live here, away from the
kernels, and are installed only when a kernel runs interpreted
(``ops.common.mosaic_gpu.interpret_params``).
"""

from __future__ import annotations

import jax

_SHIMS_INSTALLED = False


def install():
  """Let the Mosaic GPU interpreter run the attention kernels' wgmmas and layout hints.

  Known interpreter gaps, filled here and nowhere else:
    * wgmma with an operand held in registers (P of O = P V) crashes both jax 0.10.2's and
      0.11.2's interpreter (they read every operand as a shared-memory buffer);
    * jax 0.10.2 only: a ``transpose_ref`` wgmma operand (K^T) crashes it, wgmma operand
      reads are not race-checked (added here, with the reading thread's vector clock, like a
      load), and ``layout_cast`` (register layout hints, e.g. of ``plgpu.broadcasted_iota``)
      has no CPU lowering (it becomes the identity).
  The replacement only adds these cases; anything else goes to the interpreter's own code.
  """
  global _SHIMS_INSTALLED
  if _SHIMS_INSTALLED:
    return
  _SHIMS_INSTALLED = True
  try:
    import inspect
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gcb
    params = inspect.signature(gcb.wgmma).parameters
  except (ImportError, AttributeError, TypeError, ValueError):
    return  # another interpreter layout: leave it alone
  if "device_id" in params:
    _install_shims_jax_0_10(gcb)
  elif "mesh_location" in params:
    _install_shims_jax_0_11(gcb)


def _in_registers(key_or_value) -> bool:
  import numpy as np
  value = np.asarray(key_or_value)
  return value.ndim != 1 or not np.issubdtype(value.dtype, np.integer)


def _matmul_acc(acc, a, b):
  import numpy as np
  return acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc.dtype)


def _install_shims_jax_0_11(gcb):
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory as memory
  original = gcb.wgmma

  def wgmma(*, token, mesh_location, thread, acc_allocation_key_as_array, acc_transforms,
            a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
            source_info=None):
    if not _in_registers(a_allocation_key_as_array):
      return original(token=token, mesh_location=mesh_location, thread=thread,
                      acc_allocation_key_as_array=acc_allocation_key_as_array,
                      acc_transforms=acc_transforms,
                      a_allocation_key_as_array=a_allocation_key_as_array,
                      a_transforms=a_transforms,
                      b_allocation_key_as_array=b_allocation_key_as_array,
                      b_transforms=b_transforms, source_info=source_info)
    import numpy as np
    mem = gcb._get_shared_memory()
    info = memory.GPULoggingInfo(mesh_location, thread, source_info)

    def read(key_as_array, transforms):
      key = memory.HostAllocationKey.from_array(key_as_array)
      access = mem.access(key, jax.tree.map(int, gcb._remove_noop_transforms(transforms)))
      return key, access, mem.get_buffer_content(key, access, thread, logging_info=info)[0]

    _, _, b = read(b_allocation_key_as_array, b_transforms)
    acc_key, acc_access, acc = read(acc_allocation_key_as_array, acc_transforms)
    res = _matmul_acc(acc, np.asarray(a_allocation_key_as_array), b)
    mem.store_buffer_content(acc_key, acc_access, res, thread, logging_info=info)
    return token

  gcb.wgmma = gcb.fail_on_exception(wgmma) if hasattr(gcb, "fail_on_exception") else wgmma


def _install_shims_jax_0_10(gcb):
  import numpy as np
  from jax._src.interpreters import mlir
  from jax._src.pallas.mosaic.interpret import utils as iutils
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.state import types as state_types

  mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")

  def split(transforms):
    index, perm = [], None
    for tr in gcb._remove_noop_transforms(tuple(transforms)):
      if isinstance(tr, state_types.TransposeTransform):
        if perm is not None:
          raise NotImplementedError("two transposes of one wgmma operand")
        perm = tuple(tr.permutation)
      elif perm is not None:
        raise NotImplementedError("indexing after a transpose of a wgmma operand")
      else:
        index.append(tr)
    return iutils.to_range(jax.tree.map(int, tuple(index))), perm

  def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
            acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
            b_allocation_key_as_array, b_transforms, source_info=None):
    device_id, thread_id = int(device_id), int(thread_id)
    coords = tuple(int(x) for x in grid_point_coords)
    mem = gcb._get_shared_memory()
    tid = mem.get_global_thread_id(device_id, thread_id)
    info = iutils.GPULoggingInfo(device_id=device_id, grid_point_coords=coords,
                                 thread_id=thread_id, source_info=source_info)

    def operand(key_or_value, transforms):
      if _in_registers(key_or_value):
        return np.asarray(key_or_value)
      key = gcb.HostAllocationKey.from_array(key_or_value)
      rng, perm = split(transforms)
      data, _, clock = mem.get_buffer_content(key, rng, tid, logging_info=info)
      if mem.detect_races:
        gcb.get_races().check_read(device_id, thread_id, clock, key, rng,
                                   source_info=source_info)
      return data if perm is None else np.transpose(data, perm)

    a = operand(a_allocation_key_as_array, a_transforms)
    b = operand(b_allocation_key_as_array, b_transforms)
    acc_key = gcb.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_range, _ = split(acc_transforms)
    acc, _, _ = mem.get_buffer_content(acc_key, acc_range, tid, logging_info=info)
    mem.store_buffer_content(acc_key, acc_range, _matmul_acc(acc.astype(acc_dtype), a, b), tid,
                             logging_info=info)
    return token

  gcb.wgmma = wgmma
