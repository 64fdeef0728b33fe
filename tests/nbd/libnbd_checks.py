"""Drives a Basalt NBD gateway through libnbd's Python binding (python3-libnbd):
every negotiation option and every command, the error replies included, and
checks that the connection stays usable after each error.

    /usr/bin/python3 libnbd_checks.py HOST:PORT EXPORT SIZE_BYTES

Prints "ALL OK" at the end; any failed check raises and exits non-zero.
Run by tests/tests/nbd.rs against a fresh, empty volume.
"""

import errno
import sys

import nbd

addr, export, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
MIB = 1 << 20


def expect_errno(call, want, what):
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == want, f"{what}: errno {e.errnum} ({e.string}), wanted {want}"
        return
    raise AssertionError(f"{what}: succeeded, wanted errno {want}")


# --- Negotiation, option by option (opt mode stops before transmission) ----
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(f"nbd://{addr}/{export}")
assert h.aio_is_negotiating()

names = []
h.opt_list(lambda name, description: names.append(name))
assert export in names, f"NBD_OPT_LIST: {names}"

# An unknown export is refused with an error reply; negotiation continues.
h.set_export_name("no-such-volume")
try:
    h.opt_info()
    raise AssertionError("NBD_OPT_INFO of an unknown export succeeded")
except nbd.Error:
    pass
assert h.aio_is_negotiating(), "an option error must not end the negotiation"

contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name))
assert contexts == ["base:allocation"], f"NBD_OPT_LIST_META_CONTEXT: {contexts}"

h.set_export_name(export)
h.set_full_info(True)
h.opt_info()
assert h.get_size() == size, h.get_size()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB
assert h.get_canonical_export_name() == export
assert "Basalt volume" in h.get_export_description()
assert h.is_read_only() == 0
for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_cache, h.can_multi_conn):
    assert can() == 1, can.__name__
assert h.can_df() == 0, "DF is not advertised"

h.add_meta_context("base:allocation")
h.opt_go()
assert not h.aio_is_negotiating()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation") == 1

# --- Every command -----------------------------------------------------------
data = bytes(range(256)) * 64  # 16 KiB
h.pwrite(data, 1 * MIB, nbd.CMD_FLAG_FUA)
assert h.pread(len(data), 1 * MIB) == data
h.flush()
h.cache(len(data), 1 * MIB)

h.pwrite(b"\xab" * (64 * 1024), 2 * MIB)
h.zero(8192, 2 * MIB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 2 * MIB) == bytes(8192)
assert h.pread(4096, 2 * MIB + 8192) == b"\xab" * 4096
h.trim(16384, 2 * MIB + 16384)
assert h.pread(16384, 2 * MIB + 16384) == bytes(16384)


def extents(length, offset, flags=0):
    seen = []

    def callback(context, start, entries, err):
        assert context == "base:allocation", context
        seen.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, callback, flags)
    return seen


# 16 KiB written at 1 MiB: data, then a hole up to the object's end.
got = extents(64 * 1024, 1 * MIB)
assert got[0] == (16384, 0), got
assert got[1][1] == 3, got
assert extents(64 * 1024, 1 * MIB, nbd.CMD_FLAG_REQ_ONE) == [(16384, 0)]
assert extents(4096, 3 * MIB) == [(4096, 3)]

# --- Error replies; the connection stays usable after each -------------------
h.set_strict_mode(0)  # let libnbd send what the server must refuse
expect_errno(lambda: h.pread(4096, 1), errno.EINVAL, "unaligned read")
expect_errno(lambda: h.pread(4096, size), errno.EINVAL, "read past the end")
expect_errno(lambda: h.pwrite(b"x" * 4096, size - 2048), errno.EINVAL, "write across the end")
expect_errno(lambda: h.pwrite(b"x" * 100, 0), errno.EINVAL, "short write")
expect_errno(lambda: h.trim(4096, size), errno.EINVAL, "trim past the end")
expect_errno(lambda: h.pread(48 * MIB, 0), errno.EOVERFLOW, "read above the maximum")
expect_errno(
    lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL, "unadvertised FAST_ZERO"
)
expect_errno(lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA), errno.EINVAL, "FUA on a read")
assert h.pread(len(data), 1 * MIB) == data, "connection unusable after errors"
h.shutdown()

# --- NBD_OPT_ABORT -----------------------------------------------------------
a = nbd.NBD()
a.set_opt_mode(True)
a.connect_uri(f"nbd://{addr}/{export}")
a.opt_abort()
assert a.aio_is_closed() or a.aio_is_dead()

# --- Old-style NBD_OPT_EXPORT_NAME with simple replies -----------------------
s = nbd.NBD()
s.set_handshake_flags(0)  # no fixed newstyle: libnbd falls back to EXPORT_NAME
s.set_request_structured_replies(False)
s.connect_uri(f"nbd://{addr}/{export}")
assert not s.get_structured_replies_negotiated()
assert s.get_size() == size
assert s.pread(len(data), 1 * MIB) == data
s.set_strict_mode(0)
expect_errno(lambda: s.pread(4096, 3), errno.EINVAL, "unaligned read, simple reply")
assert s.pread(4096, 1 * MIB) == data[:4096]
s.shutdown()

print("ALL OK")
