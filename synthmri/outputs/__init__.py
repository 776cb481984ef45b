"""Output files of a sampling run: their names and layout (`layout`) and the writers (`writers`).

The API, the worker, `synthmri sample` and training all take names from here, so a file
is named in one place. `layout` needs only the standard library (the API imports it);
`writers` needs numpy, Pillow and nibabel, and never torch.
"""
