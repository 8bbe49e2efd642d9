# solov2_d2 must be imported before any detectron2 module: it bridges a detectron2 installed
# without compiled ops (solov2_d2.compat).
import solov2_d2  # noqa: F401
