"""supd: a single-threaded, epoll-driven process supervisor for Linux.

Importing the package stays cheap (no ctypes, no pydantic) so that supctl starts fast.
"""

__version__ = "0.1.0"
