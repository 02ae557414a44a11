"""See a reconstruction in a browser.

- :mod:`.static_page`: one self-contained HTML file per mesh (``vrn-reconstruct
  --formats html``): the photo with the mesh over it and the coloured mesh in 3D, the
  mesh embedded as a binary GLB, three.js inlined; it opens offline.
- :mod:`.server`: ``vrn-live --web``, the live page: camera frames, meshes and the HUD
  over a WebSocket, each client with its own bounded queue (the optional ``web`` extra).
- :mod:`.encode`: what the browser is sent (JPEG frames, quantised mesh messages, GLB).
- :mod:`.assets`: the shipped files both pages share (``static/``: the viewer module
  ``viewer.js``, the live page's socket worker ``live_socket.js``, the page template,
  three.js r187 with its licence).

This package may import :mod:`vrn.runtime`; the runtime never imports it (the command
line hands :func:`vrn.runtime.live.run_live` a publisher object instead).
"""
