"""The project's own embedded sample (made by `data.make_sample`) and example configs."""
