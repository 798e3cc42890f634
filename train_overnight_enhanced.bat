@echo off
rem Theta overnight run: pre-flight, prepare the data, train, evaluate and optimise, in one unattended command.
rem
rem   train_overnight_enhanced.bat --profile quick          theta-tiny, CPU, the whole pipeline in minutes
rem   train_overnight_enhanced.bat                          rtx3060 on a CUDA GPU, quick otherwise
rem   train_overnight_enhanced.bat --preflight              the pre-flight checks alone (and a test email)
rem   train_overnight_enhanced.bat --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
rem
rem Expected time: quick: its training took 335 s on a 2-core AMD EPYC (no GPU), plus the other steps (not timed
rem as a whole); rtx3060 (gpt2-medium): not measured here (no GPU), most of a night on an RTX 3060 by its plan.
rem Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
rem Re-running the same command resumes the unfinished run when Datasets\, the profile and the flags are unchanged;
rem otherwise it starts a new run and says why (--fresh: always new; --resume RUN_ID: that one). README.md, "Resuming".
rem Every decision beyond the chain of steps below lives in src\utils\overnight.py (the run's lifecycle: plan, banner,
rem start, step, prepared, failed, completed), which train_overnight_enhanced.sh calls the same way: the two run the
rem same steps with the same flags in the same order. What is left here is what cmd must do itself: find Python,
rem read the plan, check exit codes.
rem Ctrl-C and closing the window: cmd has no trap, so the step runner (overnight step) does what it can. Ctrl-C
rem reaches every process of the console: the step stops (training after a checkpoint), the runner records it,
rem prints the FAILED line, sends the failure email and returns 130; cmd then asks "Terminate batch job (Y/N)?",
rem and either answer ends the run (N goes to :failed, which adds nothing). Closing the window gives the runner
rem about 5 seconds to record the step as interrupted and try the email; the step itself is killed, as by kill -9.
rem Running the same command again resumes and skips the steps that had finished. TRAINING_PIPELINE.md, "Signals
rem and interruptions".
rem Trainer flags after -- pass through cmd: keep the characters  %  ^  "  out of them.
rem Email (start, every epoch, status, completion, failure): set EMAIL_* in .env, see documentation\EMAIL_NOTIFICATIONS.md.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0"

rem --- virtual environment (THETA_PYTHON: use that interpreter as it is) ---------------------------------------------
rem Every Python command goes through "call", so PY may also be a .bat or .cmd wrapper.
if not defined THETA_PYTHON goto find_python
set "PY=%THETA_PYTHON%"
goto have_python
:find_python
set "PY_SYS="
where py >nul 2>&1 && set "PY_SYS=py -3"
if not defined PY_SYS where python >nul 2>&1 && set "PY_SYS=python"
if not defined PY_SYS (echo error: Python 3.10+ is needed; install it from python.org and tick "Add to PATH" 1>&2 & exit /b 2)
set "PY="
for /f "delims=" %%P in ('%PY_SYS% src\utils\bootstrap_env.py --requirements requirements.txt') do set "PY=%%P"
if not defined PY (echo error: the virtual environment could not be set up, see the messages above 1>&2 & exit /b 2)
if not exist "%PY%" (echo error: bootstrap_env.py printed "%PY%", which does not exist 1>&2 & exit /b 2)
:have_python

rem --- one overnight run per project folder ---------------------------------------------------------------------
rem Runs share Datasets\ and its prepared files, so a second script here (a double-click, or the same command typed
rem again while the night runs) is refused at once, exit 2, naming the running one. cmd cannot hold a lock itself:
rem this script runs again under "run_lock hold", which holds the OS lock on models\.overnight.lock until the inner
rem run ends (THETA_OVERNIGHT_HELD marks the inner one). --help and --preflight write nothing and need no lock.
if defined THETA_OVERNIGHT_HELD goto lock_done
set "NEEDS_LOCK=1"
for %%A in (%*) do (
  if "%%~A"=="-h" set "NEEDS_LOCK=0"
  if "%%~A"=="--help" set "NEEDS_LOCK=0"
  if "%%~A"=="--preflight" set "NEEDS_LOCK=0"
)
if "%NEEDS_LOCK%"=="0" goto lock_done
set "THETA_OVERNIGHT_HELD=1"
if not exist models mkdir models
call "%PY%" -m src.utils.run_lock hold --dir models --lock_file models\.overnight.lock --what "overnight run" ^
  --hint "one overnight run per project folder (they share Datasets\ and its prepared files)" -- "%~f0" %*
exit /b %ERRORLEVEL%
:lock_done

rem --- the plan: arguments, profile, run id, resume or not (and why), the flags of each step -------------------------
set "PLAN=%TEMP%\theta_plan_%RANDOM%%RANDOM%.cmd"
call "%PY%" -m src.utils.overnight plan --out "%PLAN%" --format cmd --script "%~nx0" -- %*
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" exit /b %CODE%
call "%PLAN%"
del /q "%PLAN%" >nul 2>&1
if "%ACTION%"=="help" goto help
if "%ACTION%"=="preflight" goto preflight_only

rem The scripts send the start/failure/completion emails of the whole chain; the trainer then sends only its epoch
rem and status emails (src\training\run_emails.py).
set "THETA_NOTIFY_FROM_SCRIPT=1"
set "PYTHONUNBUFFERED=1"
set "PYTHONIOENCODING=utf-8"
rem Every step runs through the lifecycle's step runner: its output goes to the console, the log and %STEP_OUT%
rem (Windows has no tee), a finished train, evaluate or optimise step is recorded, and a rerun skips it.
set STEP_RUN=call "%PY%" -m src.utils.overnight step --run_dir "%RUN_DIR%"
set "STEPS=5"
set "STEP_NO=0"

rem Pre-flight: what would kill the run later stops it now (model, disk, memory, data, tokens, email).
set "STEP=pre-flight"
%STEP_RUN% --step "%STEP%" -- "%PY%" -m src.training.preflight --profile %PROFILE% --gpus %GPUS% --run_dir "%RUN_DIR%" ^
  %PREFLIGHT_FLAGS% -- %TRAIN_EXTRA%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
set "STEP=start"
call "%PY%" -m src.utils.overnight banner --run_dir "%RUN_DIR%" --python "%PY%"

if not "%TENSORBOARD%"=="1" goto tensorboard_done
start "theta tensorboard" /b "%PY%" -m tensorboard.main --logdir models --host 127.0.0.1 --port %TB_PORT% >nul 2>&1
set "L=tensorboard: http://127.0.0.1:%TB_PORT%/ (stops when this window closes)" & call :say
:tensorboard_done

call "%PY%" -m src.utils.overnight start --run_dir "%RUN_DIR%"

rem The knowledge base runs before preparation: prepare_data_for_training reads its outputs when they exist.
set "STEP=knowledge base"
if "%KB%"=="1" goto kb_run
set "WHY=%KB_WHY%" & call :skip_step
goto kb_done
:kb_run
set /a STEP_NO+=1
%STEP_RUN% --step "%STEP%" --number %STEP_NO%/%STEPS% -- "%PY%" -m src.data_processing.knowledge_base_enhancer_main ^
  --datasets_dir Datasets
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
:kb_done

set "STEP=prepare data"
if "%PREPARE%"=="1" goto prepare_run
set "WHY=%PREPARE_WHY%" & call :skip_step
goto prepare_done
:prepare_run
set /a STEP_NO+=1
%STEP_RUN% --step "%STEP%" --number %STEP_NO%/%STEPS% -- "%PY%" -m src.data_processing.prepare_data_for_training ^
  --datasets_dir Datasets ^
  --output Datasets\enhanced_training_data.json ^
  %PREPARE_FLAGS%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
call "%PY%" -m src.utils.overnight prepared --run_dir "%RUN_DIR%"
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
set "STEP=data check"
%STEP_RUN% --step "%STEP%" -- "%PY%" -m src.training.preflight --only data --profile %PROFILE% --gpus %GPUS% ^
  --run_dir "%RUN_DIR%" -- %TRAIN_EXTRA%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
:prepare_done

rem Train, evaluate and optimise record their output when they finish: a rerun skips them while it is unchanged.
set LAUNCH="%PY%"
if not "%GPUS%"=="1" set LAUNCH="%PY%" -m torch.distributed.run --standalone --nproc_per_node %GPUS%
set "STEP=train"
set /a STEP_NO+=1
%STEP_RUN% --step "%STEP%" --number %STEP_NO%/%STEPS% --output "%RUN_DIR%\theta_final" -- %LAUNCH% ^
  -m src.training.train_enhanced ^
  --profile %PROFILE% ^
  --data_path Datasets\enhanced_training_data.json ^
  --output_dir "%RUN_DIR%" ^
  --resume auto ^
  %TRAIN_EXTRA%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

set "STEP=evaluate"
set /a STEP_NO+=1
%STEP_RUN% --step "%STEP%" --number %STEP_NO%/%STEPS% --output "stats\evaluation_%RUN_ID%.json" -- "%PY%" ^
  -m src.training.evaluate_model ^
  --model_path "%RUN_DIR%\theta_final" ^
  --output_file "stats\evaluation_%RUN_ID%.json"
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

set "STEP=optimise for inference"
set /a STEP_NO+=1
%STEP_RUN% --step "%STEP%" --number %STEP_NO%/%STEPS% --output "%RUN_DIR%\theta_inference" -- "%PY%" ^
  -m src.training.optimize_for_inference ^
  --model_path "%RUN_DIR%\theta_final" ^
  --output_path "%RUN_DIR%\theta_inference" ^
  %OPTIMISE_FLAGS%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

set "STEP=completed"
call "%PY%" -m src.utils.overnight completed --run_dir "%RUN_DIR%" --python "%PY%"
exit /b 0

:failed
rem Records the failure (a user error, exit 2, is never resumed), prints the step, the log and the error, and sends
rem the failure email; a step stopped by Ctrl-C or a closed window was reported by its runner already.
call "%PY%" -m src.utils.overnight failed --run_dir "%RUN_DIR%" --step "%STEP%" --exit_code %CODE%
exit /b %CODE%

:help
call "%PY%" -m src.utils.overnight usage --script "%~nx0"
exit /b %ERRORLEVEL%

:preflight_only
call "%PY%" -m src.training.preflight --profile %PROFILE% --gpus %GPUS% %PREFLIGHT_FLAGS% -- %TRAIN_EXTRA%
exit /b %ERRORLEVEL%

rem --- helpers ----------------------------------------------------------------------------------------------------------
:say
rem Print %L% on the console and append it to the log (the helper's own texts: no  | < > &  in them).
echo.%L%
>>"%LOG%" echo.%L%
exit /b 0

:skip_step
set /a STEP_NO+=1
set "L=" & call :say
set "L=[%STEP_NO%/%STEPS%] %STEP%: %WHY%" & call :say
exit /b 0
