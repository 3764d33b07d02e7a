"""Applications over the mmrepvgg library: the benchmark and the demo.

They live beside the command lines in ``tools/`` and are not part of the
package that users install.
"""
