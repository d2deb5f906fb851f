from homelab_dagster.cli import main

main()
