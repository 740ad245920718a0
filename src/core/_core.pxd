# The one extension module, pymq._core: every part is included here so that
# no cimport has to resolve across modules.

include "includes/posix.pxd"
include "segment.pxd"
include "store.pxd"
include "ring.pxd"
include "group.pxd"
include "receipts.pxd"
include "protocol.pxd"
