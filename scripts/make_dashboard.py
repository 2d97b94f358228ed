"""Write configs/grafana/pdkit.json: the same as ``python -m pdkit.grafana`` (pdkit/grafana.py)."""

from pdkit.grafana import main

if __name__ == "__main__":
    main()
