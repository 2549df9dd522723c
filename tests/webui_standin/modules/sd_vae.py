"""modules/sd_vae.py: the VAE list, name -> path."""

vae_dict: dict[str, str] = {}
refreshes = 0


def refresh_vae_list():
    global refreshes
    refreshes += 1
