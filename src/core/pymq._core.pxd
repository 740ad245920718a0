# Cython finds the declarations of the module pymq._core under its dotted
# name; the declarations themselves are in _core.pxd.

include "_core.pxd"
