from sclip_lightning.cli import main

main()
