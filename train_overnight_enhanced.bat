@echo off
rem Theta overnight run: prepare the data, train, evaluate and optimise, in one unattended command.
rem
rem   train_overnight_enhanced.bat --profile quick          theta-tiny, CPU, the whole pipeline in minutes
rem   train_overnight_enhanced.bat                          rtx3060 on a CUDA GPU, quick otherwise
rem   train_overnight_enhanced.bat --gpus 2 --tensorboard -- --epochs 10 --learning_rate 5e-5
rem
rem Expected time: quick about 4-5 minutes on 2 CPU cores (measured 4 min 24 s); rtx3060 (gpt2-medium) most of a night on an RTX 3060.
rem Disk: the venv about 1.6 GB (CPU torch); a quick run about 100 MB; a gpt2-medium run about 6 GB with checkpoints.
rem Re-running the same command after a crash or a kill resumes the unfinished run (the newest models\<run>\
rem without a DONE marker). train_overnight_enhanced.sh runs the same steps with the same flags in the same order.
rem Email (start, every epoch, status, completion, failure): set EMAIL_* in .env, see documentation\EMAIL_NOTIFICATIONS.md.
rem Messages go through ":say" (console and log); keep the characters  | < > &  out of them.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0"

set "PROFILE="
set "GPUS=1"
set "TENSORBOARD=0"
set "TRAIN_EXTRA="
:parse
if "%~1"=="" goto parsed
set "ARG=%~1"
if "%ARG%"=="--" goto collect
if /i "%ARG%"=="-h" goto usage
if /i "%ARG%"=="--help" goto usage
if /i "%ARG%"=="--tensorboard" (set "TENSORBOARD=1" & shift & goto parse)
if /i "%ARG:~0,10%"=="--profile=" (set "PROFILE=%ARG:~10%" & shift & goto parse)
if /i "%ARG:~0,7%"=="--gpus=" (set "GPUS=%ARG:~7%" & shift & goto parse)
if /i "%ARG%"=="--profile" (
  if "%~2"=="" (echo error: --profile needs a value: quick or rtx3060 1>&2 & exit /b 2)
  set "PROFILE=%~2"
  shift & shift & goto parse
)
if /i "%ARG%"=="--gpus" (
  if "%~2"=="" (echo error: --gpus needs a number 1>&2 & exit /b 2)
  set "GPUS=%~2"
  shift & shift & goto parse
)
echo error: unknown option '%ARG%' (flags for the trainer go after --) 1>&2
exit /b 2
:collect
shift
if "%~1"=="" goto parsed
set TRAIN_EXTRA=%TRAIN_EXTRA% "%~1"
goto collect
:usage
for /f "skip=1 tokens=1,* delims= " %%A in ('findstr /b /c:"rem" "%~f0"') do echo(%%B
echo Options: --profile quick^|rtx3060  --gpus N  --tensorboard  --  ^<flags for train_enhanced.py^>
exit /b 0
:parsed
if "%PROFILE%"=="" goto profile_ok
if /i "%PROFILE%"=="quick" goto profile_ok
if /i "%PROFILE%"=="rtx3060" goto profile_ok
echo error: --profile must be quick or rtx3060, not '%PROFILE%' 1>&2
exit /b 2
:profile_ok
echo %GPUS%| findstr /r /x "[1-9][0-9]*" >nul || (echo error: --gpus must be a whole number of at least 1, not '%GPUS%' 1>&2 & exit /b 2)

rem --- profile: rtx3060 where a CUDA GPU answers, quick otherwise ---------------------------------------------------
set "PROFILE_WHY=chosen with --profile"
if not "%PROFILE%"=="" goto profile_done
set "PROFILE=quick"
set "PROFILE_WHY=no CUDA GPU was found"
where nvidia-smi >nul 2>&1 || goto profile_done
nvidia-smi -L >nul 2>&1 || goto profile_done
set "PROFILE=rtx3060"
set "PROFILE_WHY=a CUDA GPU was found (nvidia-smi)"
:profile_done
rem The quick profile keeps the prepared data small: no raising of small domains to the default minimum count.
rem Data preparation per profile (documentation\DATA_PROCESSING.md): quick keeps the data small (about 600 records
rem from the sample data), the overnight profile balances every domain up to 300 records.
set "PREPARE_PROFILE_FLAGS=--max_domain_fraction 0.2 --min_domain_count 300 --synthetic_ratio 0.1 --near_dup_threshold 0.8"
if /i "%PROFILE%"=="quick" set "PREPARE_PROFILE_FLAGS=--max_domain_fraction 0.3 --min_domain_count 100 --synthetic_ratio 0.1 --near_dup_threshold 0.8"

rem --- virtual environment ------------------------------------------------------------------------------------------
set "PY_SYS="
where py >nul 2>&1 && set "PY_SYS=py -3"
if not defined PY_SYS where python >nul 2>&1 && set "PY_SYS=python"
if not defined PY_SYS (echo error: Python 3.10+ is needed; install it from python.org and tick "Add to PATH" 1>&2 & exit /b 2)
set "PY="
for /f "delims=" %%P in ('%PY_SYS% src\utils\bootstrap_env.py --requirements requirements.txt') do set "PY=%%P"
if not defined PY (echo error: the virtual environment could not be set up, see the messages above 1>&2 & exit /b 2)
if not exist "%PY%" (echo error: bootstrap_env.py printed "%PY%", which does not exist 1>&2 & exit /b 2)

rem --- run id: fixed once; an unfinished run is resumed ---------------------------------------------------------------
if not exist models mkdir models
set "RUN_ID="
for /f "delims=" %%D in ('dir /b /ad /on "models\theta_enhanced_*" 2^>nul') do if not exist "models\%%D\DONE" set "RUN_ID=%%D"
set "RESUMING=1"
set "RESUMING_FLAG=--resuming"
if defined RUN_ID goto run_id_done
set "RESUMING=0"
set "RESUMING_FLAG="
rem Digits only, from Python: %DATE% depends on the locale.
for /f "delims=" %%R in ('call "%PY%" -c "from src.utils.common import new_run_id; print(new_run_id())"') do set "RUN_ID=%%R"
:run_id_done
set "RUN_DIR=models\%RUN_ID%"
if not exist logs mkdir logs
if not exist "%RUN_DIR%" mkdir "%RUN_DIR%"
if not exist stats mkdir stats
set "LOG=logs\training_enhanced_%RUN_ID%.log"
set "STEP_OUT=logs\.step_output_%RUN_ID%.txt"
rem Keep the newest 5 logs with this one (never this run's own).
for /f "skip=4 delims=" %%L in ('dir /b /a-d /o-n "logs\training_enhanced_*.log" 2^>nul') do if /i not "logs\%%L"=="%LOG%" del /q "logs\%%L"

rem The scripts send the start/failure/completion emails of the whole chain; the trainer then sends only its epoch
rem and status emails (src\training\email_integration.py).
set "THETA_NOTIFY_FROM_SCRIPT=1"
set "PYTHONUNBUFFERED=1"
set "PYTHONIOENCODING=utf-8"
rem Windows has no tee: every step runs through this one (console, log and %STEP_OUT%), and the email commands
rem through LOG_TEE (console and log).
set STEP_TEE="%PY%" -m src.training.email_integration tee --log "%LOG%" --step_output "%STEP_OUT%" --
set LOG_TEE="%PY%" -m src.training.email_integration tee --log "%LOG%" --

set "KB_MODULE=src\data_processing\knowledge_base_enhancer_main.py"
set "KB_WHY=skipped (knowledge_base_enhancer_main.py not installed)"
if exist "%KB_MODULE%" set "KB_WHY=skipped (no Datasets\knowledge\ folder)"
if exist "%KB_MODULE%" if exist "Datasets\knowledge\" set "KB_WHY=on (Datasets\knowledge\ found)"
set "PREPARE_WHY=Datasets\ to Datasets\enhanced_training_data.json %PREPARE_PROFILE_FLAGS%"
if "%RESUMING%"=="1" if exist "Datasets\enhanced_training_data.json" set "PREPARE_WHY=skipped: resuming, the run keeps the data it started with"
set "DEVICE=unknown"
for /f "delims=" %%G in ('call "%PY%" -m src.utils.gpu_info --summary 2^>nul') do set "DEVICE=%%G"
set "EMAIL_LINE=email: unknown"
for /f "delims=" %%E in ('call "%PY%" -m src.utils.email_notifier --show-config 2^>^&1') do set "EMAIL_LINE=%%E"
set "RESUMING_TEXT="
if "%RESUMING%"=="1" set "RESUMING_TEXT= (resuming)"
set "GPUS_TEXT="
if not "%GPUS%"=="1" set "GPUS_TEXT= (torchrun, one machine)"
set "TB_TEXT=off"
if "%TENSORBOARD%"=="1" set "TB_TEXT=http://127.0.0.1:6006/"

set "L===============================================================================" & call :say
set "L= Theta overnight run %RUN_ID%%RESUMING_TEXT%" & call :say
set "L= started     %DATE% %TIME:~0,8%" & call :say
set "L= profile     %PROFILE% (%PROFILE_WHY%)" & call :say
set "L= device      %DEVICE%" & call :say
set "L= gpus        %GPUS%%GPUS_TEXT%" & call :say
set "L= python      %PY%" & call :say
set "L= run folder  %RUN_DIR%" & call :say
set "L= log         %LOG%" & call :say
set "L= data        %PREPARE_WHY%" & call :say
set "L= knowledge   %KB_WHY%" & call :say
set "L= trainer     --profile %PROFILE% --resume auto %TRAIN_EXTRA%" & call :say
set "L= tensorboard %TB_TEXT%" & call :say
set "L= %EMAIL_LINE%" & call :say
set "L===============================================================================" & call :say

set "STEP=start"
set "STEPS=5"
set "STEP_NO=0"
if "%TENSORBOARD%"=="1" (
  start "theta tensorboard" /b "%PY%" -m tensorboard.main --logdir models --host 127.0.0.1 --port 6006 >nul 2>&1
  set "L=tensorboard: http://127.0.0.1:6006/ (stops when this window closes)" & call :say
)

%LOG_TEE% "%PY%" -m src.training.email_integration start --run_id "%RUN_ID%" --run_dir "%RUN_DIR%" --log "%LOG%" ^
  --profile %PROFILE% --gpus %GPUS% --trainer_flags "%TRAIN_EXTRA:"=%" %RESUMING_FLAG%

rem The knowledge base runs before preparation: prepare_data_for_training reads its outputs when they exist.
set "STEP=knowledge base"
if "%RESUMING%"=="1" (set "WHY=skipped: resuming" & call :skip_step & goto kb_done)
if not "%KB_WHY%"=="on (Datasets\knowledge\ found)" (set "WHY=%KB_WHY%" & call :skip_step & goto kb_done)
call :step_header
%STEP_TEE% "%PY%" -m src.data_processing.knowledge_base_enhancer_main --datasets_dir Datasets
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed
:kb_done

set "STEP=prepare data"
if "%RESUMING%"=="1" if exist "Datasets\enhanced_training_data.json" (set "WHY=%PREPARE_WHY%" & call :skip_step & goto prepare_done)
call :step_header
%STEP_TEE% "%PY%" -m src.data_processing.prepare_data_for_training ^
  --datasets_dir Datasets ^
  --output Datasets\enhanced_training_data.json ^
  --test_set Datasets\test_set.json ^
  --seed 42 ^
  --validation_fraction 0.1 ^
  %PREPARE_PROFILE_FLAGS%
set "CODE=%ERRORLEVEL%"
if "%CODE%"=="0" goto prepare_done
if not exist "Datasets\enhanced_training_data.json" goto failed
set "L=!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" & call :say
set "L=WARNING: data preparation FAILED; training on the PREVIOUS Datasets\enhanced_training_data.json" & call :say
set "L=!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" & call :say
:prepare_done

if "%GPUS%"=="1" (
  set LAUNCH="%PY%"
) else (
  set LAUNCH="%PY%" -m torch.distributed.run --standalone --nproc_per_node %GPUS%
)
set "STEP=train"
call :step_header
%STEP_TEE% %LAUNCH% -m src.training.train_enhanced ^
  --profile %PROFILE% ^
  --data_path Datasets\enhanced_training_data.json ^
  --output_dir "%RUN_DIR%" ^
  --resume auto ^
  %TRAIN_EXTRA%
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

set "STEP=evaluate"
call :step_header
%STEP_TEE% "%PY%" -m src.training.evaluate_model ^
  --model_path "%RUN_DIR%\theta_final" ^
  --test_data Datasets\test_set.json ^
  --output_file "stats\evaluation_%RUN_ID%.json"
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

set "STEP=optimise for inference"
call :step_header
%STEP_TEE% "%PY%" -m src.training.optimize_for_inference ^
  --model_path "%RUN_DIR%\theta_final" ^
  --output_path "%RUN_DIR%\theta_inference"
set "CODE=%ERRORLEVEL%"
if not "%CODE%"=="0" goto failed

>"%RUN_DIR%\DONE" echo %DATE% %TIME%
if exist "%STEP_OUT%" del /q "%STEP_OUT%"
%LOG_TEE% "%PY%" -m src.training.email_integration completed --run_id "%RUN_ID%" --run_dir "%RUN_DIR%" --log "%LOG%"
set "L=" & call :say
set "L===============================================================================" & call :say
set "L= Done: %RUN_ID%  (%DATE% %TIME:~0,8%)" & call :say
set "L= model       %RUN_DIR%\theta_final" & call :say
set "L= inference   %RUN_DIR%\theta_inference" & call :say
set "L= evaluation  stats\evaluation_%RUN_ID%.json" & call :say
set "L= report      stats\%RUN_ID%\" & call :say
set "L= log         %LOG%" & call :say
set "L= try it      "%PY%" -m src.model.theta_model chat --model_path %RUN_DIR%\theta_final" & call :say
set "L===============================================================================" & call :say
exit /b 0

:failed
set "L=" & call :say
rem Prints the step, the log and the error, then sends the failure email (when email is configured).
%LOG_TEE% "%PY%" -m src.training.email_integration failed --run_id "%RUN_ID%" --run_dir "%RUN_DIR%" --log "%LOG%" ^
  --step "%STEP%" --exit_code %CODE% --error_file "%STEP_OUT%" --show
exit /b %CODE%

rem --- helpers ----------------------------------------------------------------------------------------------------------
:say
rem Print %L% on the console and append it to the log.
echo(%L%
>>"%LOG%" echo(%L%
exit /b 0

:step_header
set /a STEP_NO+=1
set "L=" & call :say
set "L=[%STEP_NO%/%STEPS%] %STEP%  (%TIME:~0,8%)" & call :say
exit /b 0

:skip_step
set /a STEP_NO+=1
set "L=" & call :say
set "L=[%STEP_NO%/%STEPS%] %STEP%: %WHY%" & call :say
exit /b 0
